"""Render an image definition and a provider's template into a Packer template directory.

Everything is rendered in memory first and written only when every file rendered,
then swapped into place: a failed render writes nothing and leaves the previous
output intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import jinja2

from .definitions import ImageDefinition
from .digests import sha256_tree
from .errors import RenderError
from .packer import PackerFeatures
from .providers import Provider

TEMPLATE_SUFFIX = ".pkr.hcl.j2"
RENDERED_TEMPLATE = "template.pkr.hcl"
SCRIPTS = "scripts"
SOURCE_NAME = "image"


@dataclass(frozen=True)
class Rendered:
    image: str
    provider: str
    directory: Path

    @property
    def template(self) -> Path:
        return self.directory / RENDERED_TEMPLATE

    @property
    def sha256(self) -> str:
        """Digest of the template and its scripts, for the build's provenance."""
        return sha256_tree(self.directory)


def shell_words(value: str | list[str] | tuple[str, ...]) -> str:
    """A value as shell words, each quoted for POSIX sh (the `sh` filter of the scripts)."""
    if isinstance(value, (list, tuple)):
        return " ".join(shlex.quote(str(item)) for item in value)
    return shlex.quote(str(value))


def hcl_string(value: object) -> str:
    """A value inside an HCL string literal (the `hcl` filter of the templates): quotes,
    backslashes and control characters escaped, and `${` / `%{` made literal, so that no
    value can end the string or reach HCL's templating (`${file(...)}`, `${env(...)}`)."""
    escaped = json.dumps(str(value), ensure_ascii=False)[1:-1]
    return escaped.replace("${", "$${").replace("%{", "%%{")


def environment(templates_dir: Path) -> jinja2.Environment:
    # Delimiters that cannot collide with Packer's {{ .HTTPIP }} nor HCL's ${ } and [[ ]].
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir)),
        undefined=jinja2.StrictUndefined,
        block_start_string="[%",
        block_end_string="%]",
        variable_start_string="[=",
        variable_end_string="=]",
        comment_start_string="[#",
        comment_end_string="#]",
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["sh"] = shell_words
    env.filters["hcl"] = hcl_string
    env.filters["py"] = repr  # a Python literal of the value (for scripts' Python heredocs)
    return env


def _template_location(templates_dir: Path) -> str:
    """The innermost template frame of the exception being handled, as file:line."""
    for frame in reversed(traceback.extract_tb(sys.exc_info()[2])):
        if frame.filename.endswith(".j2"):
            path = Path(frame.filename)
            with contextlib.suppress(ValueError):
                path = path.relative_to(templates_dir.parent)
            return f"{path}:{frame.lineno}"
    return str(templates_dir)


def render_files(
    image: ImageDefinition,
    provider: Provider,
    templates_dir: Path,
    features: PackerFeatures,
) -> dict[str, str]:
    """Return {relative path: content} for the template and its provisioning scripts."""
    env = environment(templates_dir)
    template_name = f"{provider.name}{TEMPLATE_SUFFIX}"
    if not (templates_dir / template_name).is_file():
        raise RenderError(
            f"{templates_dir / template_name}: no template for provider {provider.name}"
        )
    script_names = sorted(
        p.name for p in (templates_dir / SCRIPTS).glob("*.j2") if not p.name.startswith("_")
    )
    settings = image.provider(provider.name)
    context = {
        "image": image,
        "provider": provider,
        "settings": settings,
        "packer": features,
        "source_name": SOURCE_NAME,
        "build_user": provider.build_user_for(settings),
        "scripts": [name.removesuffix(".j2") for name in script_names],
    }
    files: dict[str, str] = {}
    try:
        files[RENDERED_TEMPLATE] = env.get_template(template_name).render(context)
        for name in script_names:
            files[f"{SCRIPTS}/{name.removesuffix('.j2')}"] = env.get_template(
                f"{SCRIPTS}/{name}"
            ).render(context)
    except jinja2.TemplateSyntaxError as exc:
        where = f"{exc.filename or exc.name}:{exc.lineno}"
        raise RenderError(f"{where}: template syntax error: {exc.message}") from None
    except jinja2.UndefinedError as exc:
        where = _template_location(templates_dir)
        raise RenderError(
            f"{where}: {exc.message} (rendering {provider.name} for image {image.name})"
        ) from None
    return files


def write_atomically(files: dict[str, str], destination: Path) -> None:
    """Write ``files`` as the whole content of ``destination``, replacing it in one step."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        for relative, content in files.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")
            if relative.endswith(".sh"):
                path.chmod(0o755)
        if destination.exists():
            retired = destination.with_name(f".{destination.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            os.rename(destination, retired)
            os.rename(staging, destination)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def render(
    image: ImageDefinition,
    provider: Provider,
    templates_dir: Path,
    destination: Path,
    features: PackerFeatures,
) -> Rendered:
    files = render_files(image, provider, templates_dir, features)
    write_atomically(files, destination)
    return Rendered(image=image.name, provider=provider.name, directory=destination)
