"""Image definitions load through a strict schema; bad input is refused with one clear line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from imagefactory.definitions import load_image, select_images
from imagefactory.errors import ConfigError
from imagefactory.settings import REPO_ROOT

IMAGES = REPO_ROOT / "images"


@pytest.mark.parametrize("name", ["ubuntu-20.04", "ubuntu-22.04", "ubuntu-24.04", "ubuntu-26.04"])
def test_shipped_images_load(name: str) -> None:
    image = load_image(IMAGES / f"{name}.yaml")
    assert image.name == name
    assert "snapd" in image.packages.purge and "snapd" in image.packages.pin_away
    assert image.service.unit == "strongswan-starter"
    assert "af_key" in image.service.load_modules
    # Every provider Algo supports is defined, each with its base image reference.
    assert set(image.providers.names()) == {
        "qemu", "digitalocean", "amazon-ebs", "azure-arm",
        "googlecompute", "hcloud", "scaleway", "openstack",
    }  # fmt: skip


def test_focal_specifics() -> None:
    image = load_image(IMAGES / "ubuntu-20.04.yaml")
    assert (image.release, image.codename) == ("20.04", "focal")
    assert image.base.archive.pockets == ["focal", "focal-updates", "focal-security"]
    assert image.base.archive.keyring_fingerprints == [
        "790BC7277767219C42C86F933B4FE6ACC0B21F32",
        "F6ECB3762474EDA9D21B7022871920D1991BC93C",
    ]
    assert image.kernel_flavour_on("amazon-ebs") == "aws"
    assert image.kernel_flavour_on("qemu") == "generic"


def _mutate(images: Path, change) -> Path:
    path = images / "ubuntu-20.04.yaml"
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))
    return path


def _error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_image(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    return message


def test_malformed_yaml_names_file_and_line(images_copy: Path) -> None:
    path = images_copy / "ubuntu-20.04.yaml"
    path.write_text("name: ubuntu-20.04\nrelease: [20.04\n")
    assert "malformed YAML" in _error(path) and "line 3" in _error(path)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)


def test_an_alias_bomb_is_refused_at_its_first_alias(images_copy: Path) -> None:
    path = images_copy / "ubuntu-20.04.yaml"
    path.write_text(BOMB)  # ~9^9 strings if expanded
    started = time.monotonic()
    message = _error(path)
    assert time.monotonic() - started < 2
    assert "line 2" in message and "aliases (*name) are not allowed" in message
    assert len(message) < 300


def test_a_key_given_twice_is_refused_naming_it_and_its_line(images_copy: Path) -> None:
    path = images_copy / "ubuntu-20.04.yaml"
    original = path.read_text()
    path.write_text(original + "codename: jammy\n")
    line = original.count("\n") + 1
    message = _error(path)
    assert f"line {line}" in message and "key 'codename' is given twice" in message


def test_not_utf8_or_a_directory_is_one_line(images_copy: Path) -> None:
    path = images_copy / "ubuntu-20.04.yaml"
    path.write_bytes(b'name: ubuntu-20.04\nrelease: "20.04\xff"\n')
    assert "not UTF-8 text" in _error(path)
    path.unlink()
    path.mkdir()
    assert "is a directory" in _error(path)


@pytest.mark.parametrize(
    ("section", "key", "value", "problem"),
    [
        ("service", "load_modules", ["$(touch /tmp/x)"], "is not a kernel module name"),
        ("service", "load_modules", ["af_key\n"], "is not a kernel module name"),
        ("boot", "skip_cloud_init_modules", ["$(id)"], "is not a cloud-init module name"),
        ("boot", "mask_units", ["e2scrub_reap.service\nrm"], "is not a systemd unit name"),
        ("service", "unit", "strongswan-starter\n", "is not a systemd unit name"),
        ("packages", "install", ["strongswan\n"], "is not a Debian package name"),
    ],
)
def test_names_that_reach_a_script_are_refused_unless_they_are_names(
    images_copy: Path, section, key, value, problem
) -> None:
    """A trailing newline used to pass the `$` of the name patterns."""
    path = _mutate(images_copy, lambda d: d[section].__setitem__(key, value))
    message = _error(path)
    assert f"{section}.{key}" in message and problem in message


def test_a_unit_to_enable_must_be_a_unit_name(images_copy: Path) -> None:
    path = _mutate(images_copy, lambda d: d["base"]["archive"].__setitem__("enable_units", ["x\n"]))
    message = _error(path)
    assert "base.archive.enable_units" in message and "is not a systemd unit name like" in message


def test_unknown_key_lists_allowed_keys(images_copy: Path) -> None:
    path = _mutate(images_copy, lambda d: d["packages"].update(purgee=["snapd"]))
    message = _error(path)
    assert "packages.purgee: unknown key" in message
    assert "allowed: install, purge, pin_away" in message


def test_unknown_provider_key_lists_providers(images_copy: Path) -> None:
    path = _mutate(images_copy, lambda d: d["providers"].update(linode={"image": "x"}))
    message = _error(path)
    assert "providers.linode: unknown key" in message and "amazon-ebs" in message


def test_wrong_type(images_copy: Path) -> None:
    path = _mutate(images_copy, lambda d: d["providers"]["qemu"].update(memory_mb="lots"))
    message = _error(path)
    assert "providers.qemu.memory_mb" in message and "'lots'" in message


def test_missing_field(images_copy: Path) -> None:
    path = _mutate(images_copy, lambda d: d.pop("codename"))
    assert "codename: required field is missing" in _error(path)


def test_fingerprint_must_be_full(images_copy: Path) -> None:
    path = _mutate(
        images_copy, lambda d: d["base"]["archive"].update(keyring_fingerprints=["C0B21F32"])
    )
    assert "not a full 40-hex-digit OpenPGP fingerprint" in _error(path)


def test_ec2_launch_permissions_are_account_ids(images_copy: Path) -> None:
    path = _mutate(
        images_copy, lambda d: d["providers"]["amazon-ebs"].update(launch_permissions=["1234-5678"])
    )
    message = _error(path)
    assert "providers.amazon-ebs.launch_permissions.0" in message and "'1234-5678'" in message


def test_single_process_boot_needs_netcat(images_copy: Path) -> None:
    path = _mutate(images_copy, lambda d: d["packages"]["install"].remove("netcat-openbsd"))
    message = _error(path)
    assert "boot.cloud_init_single_process needs netcat-openbsd in packages.install" in message


def test_install_and_purge_must_not_overlap(images_copy: Path) -> None:
    path = _mutate(images_copy, lambda d: d["packages"]["install"].append("snapd"))
    assert "snapd cannot be both installed and purged" in _error(path)


def test_name_must_match_file(images_copy: Path) -> None:
    path = _mutate(images_copy, lambda d: d.update(name="ubuntu-20.10"))
    assert "must match the file name" in _error(path)


def test_not_a_mapping(images_copy: Path) -> None:
    path = images_copy / "ubuntu-20.04.yaml"
    path.write_text("- just\n- a list\n")
    assert "expected a mapping" in _error(path)


def test_unknown_image_names_the_available_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown image ubuntu-18\.04 .*ubuntu-20\.04"):
        select_images(IMAGES, ["ubuntu-18.04"])


def test_a_pocket_of_another_release_is_refused(images_copy: Path) -> None:
    path = _mutate(
        images_copy, lambda d: d["base"]["archive"].update(pockets=["focal", "jammy-security"])
    )
    message = _error(path)
    assert "jammy-security not a pocket of focal" in message and "focal-updates" in message


def test_parity_check_without_a_parity_section_is_refused(images_copy: Path) -> None:
    path = _mutate(images_copy, lambda d: d.pop("parity"))
    assert "checks.parity needs a parity section" in _error(path)


def test_a_package_left_out_twice_is_refused(images_copy: Path) -> None:
    def twice(data: dict) -> None:
        data["parity"]["left_out"].append({"reason": "again", "packages": ["vim"]})

    assert "left_out names vim more than once" in _error(_mutate(images_copy, twice))


def test_apparmor_confined_must_be_enforced(images_copy: Path) -> None:
    def stray(data: dict) -> None:
        data["checks"]["apparmor"]["confined"] = ["/usr/sbin/charon-systemd"]

    assert "confined /usr/sbin/charon-systemd must also be listed in enforce" in _error(
        _mutate(images_copy, stray)
    )
