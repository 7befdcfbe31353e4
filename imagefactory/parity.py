"""Parity with Ubuntu's own cloud image: what its seeds list, read from the archive at build.

Ubuntu's images are made from seeds that the archive carries as metapackages (ubuntu-minimal,
ubuntu-standard, ubuntu-server): their Depends and Recommends are what the image has. The
build records them (``apt-cache show`` inside the build, scripts/80-report.sh); the ``parity``
check then holds the booted image to them and to the image definition's ``parity.left_out``.
"""

from __future__ import annotations

import re

from .definitions import ImageDefinition
from .errors import PackerError

FIELDS = ("Depends", "Pre-Depends", "Recommends")


def parse_control(text: str) -> dict[str, list[str]]:
    """``apt-cache show`` stanzas -> metapackage: its dependency groups ("a|b": either)."""
    reference: dict[str, list[str]] = {}
    for stanza in re.split(r"\n\s*\n", text.strip()):
        fields = _fields(stanza)
        name = fields.get("Package")
        if not name:
            continue
        groups = reference.setdefault(name, [])
        for field in FIELDS:
            for item in filter(None, (part.strip() for part in fields.get(field, "").split(","))):
                alternatives = [re.sub(r"[\s(\[].*$", "", alt.strip()) for alt in item.split("|")]
                group = "|".join(alt.split(":")[0] for alt in alternatives if alt)
                if group and group not in groups:
                    groups.append(group)
    return reference


def _fields(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = ""
    for line in stanza.splitlines():
        if line[:1] in (" ", "\t") and key:
            fields[key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def reference_for(image: ImageDefinition, control_text: str) -> dict[str, list[str]]:
    """The recorded reference of a build; every metapackage the definition names must be there
    (a name the archive lacks is a definition error the build reports, not an empty seed)."""
    if image.parity is None:
        return {}
    reference = parse_control(control_text)
    missing = [name for name in image.parity.reference if name not in reference]
    if missing:
        raise PackerError(
            f"images/{image.name}.yaml: parity.reference: the archive has no "
            f"{', '.join(missing)} for {image.codename}"
        )
    return {name: reference[name] for name in image.parity.reference}


def expectations(image: ImageDefinition, reference: dict[str, list[str]]) -> dict | None:
    """What the guest's parity check judges against; None when there is nothing to compare."""
    if image.parity is None or not reference:
        return None
    left_out = image.parity.reasons()
    for name in image.packages.purge:
        left_out.setdefault(name, "purged from the image (packages.purge)")
    groups = sorted({group for groups in reference.values() for group in groups})
    return {"reference": groups, "metapackages": list(reference), "left_out": left_out}
