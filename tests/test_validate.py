"""`packer validate` with the real binary on every image x provider, offline."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from imagefactory import matrix
from imagefactory.errors import PackerError
from imagefactory.packer import Packer
from imagefactory.providers import get_provider
from imagefactory.settings import Settings
from imagefactory.steps import StepLog


def test_every_image_and_provider_validates(settings: Settings) -> None:
    log_lines: list[str] = []
    pairs = matrix.select_pairs(settings, None, None)
    assert len(pairs) == 4 * 8
    rendered = matrix.validate_pairs(settings, pairs, Packer(), StepLog(out=_Sink(log_lines)))
    assert {r.provider for r in rendered} == {
        "qemu", "digitalocean", "amazon-ebs", "azure-arm",
        "googlecompute", "hcloud", "scaleway", "openstack",
    }  # fmt: skip
    assert sum("valid: " in line for line in log_lines) == 4 * 8
    assert all(r.template.is_file() for r in rendered)


def test_openstack_validates_fully_against_a_local_identity_service(
    settings: Settings, keystone: dict
) -> None:
    requests = keystone.pop("_requests")
    pair = matrix.select_pairs(settings, ["ubuntu-20.04"], ["openstack"])[0]
    [rendered] = matrix.render_pairs(settings, [pair], Packer().features(), StepLog())
    packer = Packer(env=os.environ | keystone)
    with tempfile.TemporaryDirectory() as scratch:
        variables = get_provider("openstack").validation_variables(Path(scratch))
        packer.validate(rendered.template, variables)
    assert [path for path, _ in requests] == ["/v3/auth/tokens"]


def test_validate_reports_packers_own_error(settings: Settings, tmp_path: Path) -> None:
    """A template Packer rejects fails with Packer's message, not a traceback."""
    pair = matrix.select_pairs(settings, ["ubuntu-20.04"], ["digitalocean"])[0]
    [rendered] = matrix.render_pairs(settings, [pair], Packer().features(), StepLog())
    text = rendered.template.read_text().replace('size          = "s-1vcpu-1gb"', "")
    rendered.template.write_text(text)
    variables = get_provider("digitalocean").validation_variables(tmp_path)
    env = os.environ | {"DIGITALOCEAN_API_TOKEN": "x"}
    with pytest.raises(PackerError, match="size is required"):
        Packer(env=env).validate(rendered.template, variables)


class _Sink:
    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def write(self, text: str) -> None:
        self.lines.extend(t for t in text.splitlines() if t)

    def flush(self) -> None:
        pass
