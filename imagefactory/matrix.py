"""The image x provider matrix: select pairs, render them, validate them with Packer."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .definitions import ImageDefinition, select_images
from .errors import ConfigError
from .packer import Packer, PackerFeatures
from .providers import Provider, select_providers
from .render import Rendered, render
from .settings import Settings
from .steps import StepLog


@dataclass(frozen=True)
class Pair:
    image: ImageDefinition
    provider: Provider

    @property
    def label(self) -> str:
        return f"{self.image.name} on {self.provider.name}"


def select_pairs(
    settings: Settings, images: list[str] | None, providers: list[str] | None
) -> list[Pair]:
    """Every (image, provider) asked for. A provider named explicitly must be defined by
    every image asked for; by default an image gets the providers it defines."""
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


def render_pairs(
    settings: Settings, pairs: list[Pair], features: PackerFeatures, log: StepLog
) -> list[Rendered]:
    rendered = []
    for pair in pairs:
        destination = settings.rendered_dir(pair.image.name, pair.provider.name)
        rendered.append(
            render(pair.image, pair.provider, settings.templates_dir, destination, features)
        )
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
    """Render and `packer validate` every pair; raises on the first failure."""
    environ = os.environ if environ is None else environ
    rendered = render_pairs(settings, pairs, packer.features(), log)
    with tempfile.TemporaryDirectory(prefix="imagefactory-validate-") as scratch:
        for pair, result in zip(pairs, rendered):
            provider = pair.provider
            # Placeholders only for credentials the environment does not supply.
            placeholders = {k: v for k, v in provider.validation_env.items() if not environ.get(k)}
            syntax_only = provider.offline_validation == "syntax-only"
            variables = provider.validation_variables(Path(scratch) / provider.name)
            packer.validate(
                result.template, variables, syntax_only=syntax_only, extra_env=placeholders
            )
            how = "syntax only: its builder logs in while validating" if syntax_only else "full"
            log.say(f"valid: {pair.label} ({how})")
    return rendered
