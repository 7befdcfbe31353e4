"""The image x provider matrix: select pairs, render them, validate them with Packer."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .definitions import ImageDefinition, available_images, select_images
from .errors import ConfigError
from .packer import Packer, PackerFeatures, stop_running
from .providers import Provider, select_providers
from .render import Rendered, render_files, write_atomically
from .settings import Settings
from .steps import StepLog


@dataclass(frozen=True)
class Pair:
    image: ImageDefinition
    provider: Provider

    @property
    def label(self) -> str:
        return f"{self.image.name} on {self.provider.name}"


ALL = "all"  # `--image all`: every image in images_dir


def image_names(settings: Settings, names: list[str] | None) -> list[str]:
    """The images a task named: ``all`` is every defined image; none is the default image.
    Repeated names count once, in the order first given."""
    if not names:
        known = available_images(settings.images_dir)
        if settings.default_image not in known:
            raise ConfigError(
                f"factory.default_image: {settings.default_image!r} is not an image in "
                f"{settings.images_dir} (allowed: {', '.join(known)})"
            )
        return [settings.default_image]
    if ALL in names:
        return available_images(settings.images_dir)
    return list(dict.fromkeys(names))


def select_pairs(
    settings: Settings, images: list[str] | None, providers: list[str] | None
) -> list[Pair]:
    """Every (image, provider) asked for. A provider named explicitly must be defined by
    every image asked for; by default an image gets the providers it defines. No image
    named means every image (``render``, ``validate``); ``all`` means the same."""
    if images and ALL in images:
        images = None
    selected_images = select_images(settings.images_dir, images)
    selected_providers = select_providers(providers)
    pairs: list[Pair] = []
    for image in selected_images:
        for provider in selected_providers:
            if image.providers.get(provider.name) is not None:
                pairs.append(Pair(image, provider))
            elif providers:
                image.provider(provider.name)  # raises a ConfigError naming what exists
    if not pairs:
        raise ConfigError("the selection matches no image and provider pair")
    return pairs


def scheduled_pairs(settings: Settings) -> list[Pair]:
    """The pairs `factory.schedule` names, for `inv rebuild` without a selection; by default
    every defined image on qemu."""
    wanted = settings.scheduled_pairs or [
        (name, "qemu") for name in available_images(settings.images_dir)
    ]
    return [
        pair for image, provider in wanted for pair in select_pairs(settings, [image], [provider])
    ]


def render_pairs(
    settings: Settings, pairs: list[Pair], features: PackerFeatures, log: StepLog
) -> list[Rendered]:
    """Render every pair in memory first, so that one failure writes nothing at all."""
    outputs = [
        (pair, render_files(pair.image, pair.provider, settings.templates_dir, features))
        for pair in pairs
    ]
    rendered = []
    for pair, files in outputs:
        destination = settings.rendered_dir(pair.image.name, pair.provider.name)
        write_atomically(files, destination)
        rendered.append(Rendered(pair.image.name, pair.provider.name, destination))
        log.say(f"rendered {pair.label} -> {destination}")
    return rendered


def provider_secrets(provider: Provider, environ: Mapping[str, str]) -> list[str]:
    return [environ[name] for name in provider.secret_env if environ.get(name)]


def all_secrets(environ: Mapping[str, str]) -> list[str]:
    return [s for p in select_providers(None) for s in provider_secrets(p, environ)]


def validate_pairs(
    settings: Settings,
    pairs: list[Pair],
    packer: Packer,
    log: StepLog,
    environ: Mapping[str, str] | None = None,
) -> list[Rendered]:
    """Render and `packer validate` every pair, in parallel; raises the first failure."""
    environ = os.environ if environ is None else environ
    rendered = render_pairs(settings, pairs, packer.features(), log)
    with (
        tempfile.TemporaryDirectory(prefix="imagefactory-validate-") as scratch,
        ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool,
    ):
        # Each packer process is mostly start-up time; one per core keeps them all busy.
        futures = [
            pool.submit(_validate_one, pair, result, packer, Path(scratch), environ)
            for pair, result in zip(pairs, rendered, strict=True)
        ]
        try:
            for pair, future in zip(pairs, futures, strict=True):
                log.say(f"valid: {pair.label} ({future.result()})")
        except BaseException:
            # An interrupt or a failure stops here: the pairs not yet started never start,
            # and the ones running are stopped.
            pool.shutdown(wait=False, cancel_futures=True)
            stop_running()
            raise
    return rendered


def _validate_one(
    pair: Pair, rendered: Rendered, packer: Packer, scratch: Path, environ: Mapping[str, str]
) -> str:
    provider = pair.provider
    # Placeholders only for credentials the environment does not supply.
    placeholders = {k: v for k, v in provider.validation_env.items() if not environ.get(k)}
    syntax_only = provider.offline_validation == "syntax-only"
    variables = provider.validation_variables(scratch / f"{pair.image.name}-{provider.name}")
    packer.validate(rendered.template, variables, syntax_only=syntax_only, extra_env=placeholders)
    return "syntax only: its builder logs in to validate" if syntax_only else "full"
