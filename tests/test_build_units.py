"""Pieces of the build that need no VM: serials, reports, manifests, seeds, records."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from imagefactory import build, nocloud, records
from imagefactory.build import next_serial, parse_manifest, read_report
from imagefactory.errors import ConfigError, GuestPanicError, PackerError
from imagefactory.steps import StepLog


def test_serials_count_up_within_a_day(tmp_path: Path) -> None:
    assert next_serial(tmp_path / "missing", today="20261126") == "20261126.1"
    (tmp_path / "20261126.1").mkdir()
    (tmp_path / "20261126.2").mkdir()
    (tmp_path / "20261125.7").mkdir()
    assert next_serial(tmp_path, today="20261126") == "20261126.3"


def _report(tmp_path: Path, members: dict[str, str]) -> Path:
    with tarfile.open(tmp_path / "report.tar", "w") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return tmp_path


def test_report_gives_facts_and_manifest(tmp_path: Path) -> None:
    manifest = "strongswan\t5.8.2-1ubuntu3.6\nlibc6:amd64\t2.31-0ubuntu9.16\n"
    facts_text = "kernel=5.4.0-200-generic\nversion_id=20.04\ncodename=focal\n"
    facts, text, reference = read_report(
        _report(tmp_path, {"facts": facts_text, "packages.manifest": manifest})
    )
    assert reference == ""  # a definition without parity asks for none
    assert facts == {"kernel": "5.4.0-200-generic", "version_id": "20.04", "codename": "focal"}
    assert parse_manifest(text) == {
        "strongswan": "5.8.2-1ubuntu3.6",
        "libc6:amd64": "2.31-0ubuntu9.16",
    }


def test_missing_report_is_a_build_failure(tmp_path: Path) -> None:
    with pytest.raises(PackerError, match="did not deliver its report"):
        read_report(tmp_path)


def test_seed_admits_only_the_ephemeral_key_and_creates_no_user(tmp_path: Path) -> None:
    key = nocloud.ephemeral_key(tmp_path / "ssh", comment="imagefactory-build-test")
    seed = nocloud.write_seed(
        tmp_path / "seed", "iid-1", "host", nocloud.build_user_data(key.public_text)
    )
    text = (seed / "user-data").read_text()
    assert text.startswith("#cloud-config\n")
    data = yaml.safe_load(text)
    assert data["ssh_authorized_keys"] == [key.public_text]
    assert data["users"] == [] and data["disable_root"] is False and data["ssh_pwauth"] is False
    assert yaml.safe_load((seed / "meta-data").read_text())["instance-id"] == "iid-1"
    assert key.public_text.startswith("ssh-ed25519 ") and key.private.stat().st_mode & 0o077 == 0


def _record(**changes) -> records.Record:
    base = dict(
        image="ubuntu-20.04",
        provider="qemu",
        serial="20261126.1",
        state="built",
        artifact="/x/ubuntu-20.04-20261126.1.qcow2",
        sha256="ab" * 32,
        size=150 * 2**20,
        kernel="5.4.0-200-generic",
        manifest="/x/ubuntu-20.04-20261126.1.manifest",
        packages={"strongswan": "5.8.2"},
        provenance=records.Provenance(
            git_commit="c0ffee", git_dirty=False, template_sha256="cd" * 32, packer_version="1.6.6"
        ),
        timings={"packer build": 200.0},
        history=[records.Transition(state="built", at="2026-11-26T16:00:00Z")],
    )
    return records.Record(**(base | changes))


def test_records_list_as_stable_json(tmp_path: Path) -> None:
    path = records.records_dir(tmp_path) / "ubuntu-20.04" / "qemu" / "20261126.1" / "record.json"
    records.save(_record(), path)
    rows = [records.summary(p, r) for p, r in records.find_all(tmp_path)]
    [row] = json.loads(records.dumps(rows))
    assert {"image", "provider", "state", "sha256", "artifact", "record"} <= set(row)
    assert row["state"] == "built" and row["record"] == str(path)
    assert "ubuntu-20.04" in records.table(rows) and "150 MiB" in records.table(rows)
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]  # no temp files left


def test_a_corrupt_record_is_reported_with_its_path(tmp_path: Path) -> None:
    path = records.records_dir(tmp_path) / "ubuntu-20.04" / "qemu" / "20261126.1" / "record.json"
    path.parent.mkdir(parents=True)
    path.write_text("{ half a record")
    with pytest.raises(ConfigError, match=r"record\.json: unreadable record: Invalid JSON"):
        records.load(path)
    assert records.find_all(tmp_path) == []  # and it hides no other (tests/test_records.py)


def test_qemu_build_variables_cover_every_template_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Packer refuses a build with an unset variable: the provider must supply them all."""
    from imagefactory import base, qemu
    from imagefactory.context import BuildRun
    from imagefactory.definitions import load_image
    from imagefactory.packer import PackerFeatures, PackerVersion
    from imagefactory.providers import get_provider
    from imagefactory.render import render_files
    from imagefactory.settings import REPO_ROOT, Settings
    from imagefactory.steps import StepLog

    image = load_image(REPO_ROOT / "images" / "ubuntu-20.04.yaml")
    fake = base.BaseImage(tmp_path / "b.qcow2", "0" * 64, "k", {"focal": "d"}, 1, "5.4", True)
    monkeypatch.setattr(base, "build_base", lambda *a, **k: fake)
    monkeypatch.setattr(qemu, "choose_accelerator", lambda *a, **k: "tcg")
    monkeypatch.setattr(qemu, "version", lambda: "QEMU emulator version 7.2")
    settings = Settings(build_dir=tmp_path / "build", cache_dir=tmp_path / "cache")
    run = BuildRun(image, settings, StepLog(), "20261126.1", tmp_path / "run")
    provider = get_provider("qemu")
    variables = {"serial", "manifest_path", "report_directory"} | set(provider.prepare_build(run))
    template = render_files(
        image, provider, settings.templates_dir, PackerFeatures(PackerVersion(1, 6, 6))
    )
    declared = set(re.findall(r'^variable "(\w+)"', template["template.pkr.hcl"], re.M))
    assert declared - {"accelerator"} <= variables
    assert run.provenance["base_image_sha256"] == "0" * 64
    user_data = yaml.safe_load((run.work / "seed" / "user-data").read_text())
    assert user_data["users"] == [] and len(user_data["ssh_authorized_keys"]) == 1


class PanickingPacker:
    """Packer whose first ``panics`` builds were stopped because the guest's kernel panicked."""

    def __init__(self, panics: int) -> None:
        self.panics, self.calls = panics, 0

    def build(self, template, variables, only, force, watch):
        self.calls += 1
        if self.calls <= self.panics:
            raise GuestPanicError(f"{template}: packer build stopped: the kernel panicked (x)")
        return ["artifact"]


def packer_build(packer: PanickingPacker, accelerator: str):
    run = SimpleNamespace(log=StepLog(out=io.StringIO()), provenance={})
    provider = SimpleNamespace(name="qemu", build_watch=lambda run: None)
    result = build._packer_build(
        run, provider, packer, Path("t.pkr.hcl"), {"accelerator": accelerator}
    )
    return result, run.provenance


def test_a_build_whose_guest_panicked_under_tcg_runs_once_more_and_says_so():
    packer = PanickingPacker(panics=1)
    artifacts, provenance = packer_build(packer, "tcg")
    assert artifacts == ["artifact"] and packer.calls == 2
    assert provenance["earlier_builds"] == [
        "build 1: t.pkr.hcl: packer build stopped: the kernel panicked (x)"
    ]


@pytest.mark.parametrize(("panics", "accelerator"), [(2, "tcg"), (1, "kvm")])
def test_a_second_panic_or_one_under_kvm_fails_the_build(panics, accelerator):
    packer = PanickingPacker(panics)
    with pytest.raises(GuestPanicError):
        packer_build(packer, accelerator)
    assert packer.calls == (2 if accelerator == "tcg" else 1)
