"""checks/parity.py and imagefactory/parity.py: Ubuntu's seeds as the archive lists them, and
the image held to them except where the definition leaves a package out on purpose."""

from __future__ import annotations

import pytest

from imagefactory import parity
from imagefactory.definitions import load_image
from imagefactory.errors import PackerError
from imagefactory.settings import REPO_ROOT

from .guest import guest_module

guest = guest_module("parity")

# `apt-cache show --no-all-versions` of two metapackages (abridged from noble's archive).
CONTROL = """\
Package: ubuntu-minimal
Version: 1.539.2
Depends: adduser, apt, dhcpcd-base, iproute2, netplan.io, python3 (>= 3.12), sudo,
 ubuntu-pro-client, vim-tiny
Recommends: rsyslog

Package: ubuntu-server
Version: 1.539.2
Depends: curl, lvm2
Recommends: chrony | time-daemon, snapd, unattended-upgrades:any
Description: The Ubuntu Server system
"""


def test_control_stanzas_give_each_metapackage_its_groups() -> None:
    reference = parity.parse_control(CONTROL)
    assert reference["ubuntu-minimal"] == [
        "adduser", "apt", "dhcpcd-base", "iproute2", "netplan.io", "python3", "sudo",
        "ubuntu-pro-client", "vim-tiny", "rsyslog",
    ]  # fmt: skip
    assert reference["ubuntu-server"] == [
        "curl", "lvm2", "chrony|time-daemon", "snapd", "unattended-upgrades",
    ]  # fmt: skip


def test_a_reference_the_archive_lacks_is_a_build_error() -> None:
    noble = load_image(REPO_ROOT / "images" / "ubuntu-24.04.yaml")
    with pytest.raises(PackerError, match=r"parity\.reference: the archive has no ubuntu-standard"):
        parity.reference_for(noble, CONTROL)


def test_purged_packages_count_as_left_out() -> None:
    noble = load_image(REPO_ROOT / "images" / "ubuntu-24.04.yaml")
    expect = parity.expectations(noble, parity.parse_control(CONTROL))
    assert expect is not None
    assert expect["left_out"]["snapd"] == "purged from the image (packages.purge)"
    assert "lvm2" in expect["left_out"] and "chrony|time-daemon" in expect["reference"]
    assert parity.expectations(noble, {}) is None  # nothing recorded: nothing to hold it to


# dpkg-query -W -f '${Package}\t${Status}\t${Provides}\n'
DPKG = """\
adduser\tinstall ok installed\t
apt\tinstall ok installed\tapt-transport-https (= 2.7.14build2)
systemd-timesyncd\tinstall ok installed\ttime-daemon
vim-tiny\tdeinstall ok config-files\t
python3\tinstall ok installed\tpython3-profiler
libc6:amd64\tinstall ok installed\t
"""


def test_installed_names_include_what_packages_provide() -> None:
    names = guest.installed_names(DPKG)
    assert {"adduser", "apt", "apt-transport-https", "time-daemon", "libc6"} <= names
    assert "vim-tiny" not in names  # only its configuration is left


def test_every_group_is_carried_or_left_out_with_a_reason() -> None:
    installed = guest.installed_names(DPKG)
    groups = ["adduser", "chrony|time-daemon", "vim-tiny", "lvm2", "curl"]
    unexplained, explained = guest.judge(groups, installed, {"vim-tiny": "no editors"})
    assert unexplained == ["lvm2", "curl"]
    assert explained == {"vim-tiny": "no editors"}


def test_each_definition_leaves_out_only_what_it_explains() -> None:
    for path in sorted((REPO_ROOT / "images").glob("*.yaml")):
        image = load_image(path)
        assert image.parity is not None and image.checks.parity is not None, path.name
        reasons = image.parity.reasons()
        installed = set(image.packages.install) | set(image.base.archive.packages)
        assert not installed & set(reasons), f"{path.name}: installs what it says it leaves out"


def test_a_recorded_26_04_guest_carries_or_explains_every_seed() -> None:
    """The first 26.04 build here, against resolute's seeds as the archive lists them: the
    definition's left_out explains everything Ubuntu's image has and this one does not."""
    resolute = load_image(REPO_ROOT / "images" / "ubuntu-26.04.yaml")
    data = REPO_ROOT / "tests/data/resolute"
    installed = guest.installed_names((data / "dpkg-query.parity").read_text())
    assert {"apparmor", "unattended-upgrades", "python3-apt", "rsyslog", "chrony"} <= installed
    assert "time-daemon" in installed  # chrony Provides it
    reference = parity.reference_for(resolute, (data / "reference.control").read_text())
    expect = parity.expectations(resolute, reference)
    assert expect is not None and len(expect["reference"]) > 100
    unexplained, explained = guest.judge(expect["reference"], installed, expect["left_out"])
    assert unexplained == []
    assert explained["snapd"] == "purged from the image (packages.purge)"
