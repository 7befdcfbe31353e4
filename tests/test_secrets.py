"""Credentials reach Packer only through its environment: never a rendered file, never a log."""

from __future__ import annotations

from pathlib import Path

from imagefactory.providers import PROVIDERS

from .conftest import run_inv


def test_tokens_in_the_environment_appear_in_no_file_and_no_log(tmp_path: Path) -> None:
    secrets = {
        name: f"sekrit-{name.lower().replace('_', '-')}-0f9e8d"
        for provider in PROVIDERS.values()
        for name in provider.secret_env
        if name not in {"OS_AUTH_URL", "GOOGLE_APPLICATION_CREDENTIALS"}
    }
    assert "DIGITALOCEAN_API_TOKEN" in secrets and "HCLOUD_TOKEN" in secrets
    result = run_inv("validate", env=secrets | {"PACKER_LOG": "1"}, tmp=tmp_path)
    assert result.returncode == 0, result.stderr
    written = [p for p in (tmp_path / "build").rglob("*") if p.is_file()]
    assert len(written) >= 24 * 6  # every template and its scripts were rendered
    for value in secrets.values():
        assert value not in result.stdout + result.stderr
        for path in written:
            assert value.encode() not in path.read_bytes(), f"{value} leaked into {path}"
