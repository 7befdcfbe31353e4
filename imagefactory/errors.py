"""One rooted exception hierarchy; tasks.py maps each class to an exit code and one line."""

from __future__ import annotations


class FactoryError(Exception):
    """Base for every error a user can act on. The message is the one line they see."""

    exit_code = 1


class ConfigError(FactoryError):
    """Bad input: an image definition, a setting, a selection that names nothing."""

    exit_code = 2


class RenderError(FactoryError):
    """A template could not be rendered (syntax error, undefined variable)."""

    exit_code = 3


class ToolMissingError(FactoryError):
    """An external program the task needs is not installed or not on PATH."""

    exit_code = 4


class PackerError(FactoryError):
    """Packer ran and reported failure (or produced no artifact)."""

    exit_code = 5


class GuestPanicError(PackerError):
    """The build's guest stopped for good (its kernel panicked): Packer was stopped at once
    instead of waiting out its SSH timeout."""
