"""What every cloud provider does the same way, over its own API driver: launch a throwaway
instance of a snapshot for the checks (destroyed always, and swept by label at the start of
every run), label verdicts, publish, and apply retention. Drivers (digitalocean.py,
hcloud.py) only translate these verbs into their API's calls."""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import yaml

from . import nocloud
from .context import Instance
from .errors import FactoryError
from .ssh import SSHTarget, wait_until_ready
from .steps import StepLog

# Every resource we create carries these labels (DigitalOcean: tags "key:value").
MANAGED = {"imagefactory": "true"}
ROLE = "imagefactory-role"  # check-instance | image
VERDICT = "imagefactory-verdict"  # certified | rejected | published
CHECK_NAME_PREFIX = "imagefactory-check-"  # check instances' names (APIs that filter by name)
LAUNCH_TIMEOUT_S = 600.0
BOOT_TIMEOUT_S = 900.0
POLL_S = 5.0

Verdict = Literal["certified", "rejected", "published"]


class CloudError(FactoryError):
    """A cloud resource did not reach the state we waited for."""


@dataclass(frozen=True)
class CloudImage:
    id: str
    name: str
    created: str  # ISO 8601; retention keeps the newest
    labels: dict[str, str]


class CloudDriver(Protocol):
    """One cloud's API, in the verbs the factory needs. Implementations raise CloudAPIError."""

    title: str
    login_user: str  # who the instance's user-data authorises (root on DO and Hetzner)
    ssh_port: int

    def image_id(self, artifact_id: str) -> str:
        """The API's image id for the id Packer reported (DigitalOcean: "nyc3:123" -> "123")."""

    def create_server(
        self, name: str, image_id: str, user_data: str, labels: dict[str, str]
    ) -> str: ...

    def server_address(self, server_id: str) -> str | None:
        """The public IPv4 once the server runs; None while it is still being created."""

    def delete_server(self, server_id: str) -> None:
        """Gone afterwards; deleting a server that no longer exists is fine."""

    def servers_labelled(self, labels: dict[str, str]) -> list[str]: ...

    def label_image(self, image_id: str, labels: dict[str, str]) -> None: ...

    def publish_image(self, image_id: str, name: str, description: str) -> list[str]:
        """Make it available (regions, protection …); returns where it now is."""

    def images_labelled(self, labels: dict[str, str]) -> list[CloudImage]: ...

    def delete_image(self, image_id: str) -> None: ...


def check_user_data(public_key: str) -> str:
    """cloud-config for a check instance: this boot's key for root, nothing else."""
    config = {"disable_root": False, "ssh_pwauth": False, "ssh_authorized_keys": [public_key]}
    return "#cloud-config\n" + yaml.safe_dump(config, sort_keys=False)


def sweep(driver: CloudDriver, log: StepLog) -> list[str]:
    """Destroy check instances an earlier, crashed run left running (found by label)."""
    left = driver.servers_labelled(MANAGED | {ROLE: "check-instance"})
    for server_id in left:
        log.say(f"{driver.title}: destroying check instance {server_id} left by an earlier run")
        driver.delete_server(server_id)
    return left


@contextlib.contextmanager
def launched(
    driver: CloudDriver, image_id: str, work: Path, log: StepLog, clock=time.monotonic
) -> Iterator[Instance]:
    """A throwaway instance of ``image_id`` reachable over SSH; destroyed on exit, always."""
    key = nocloud.ephemeral_key(work / "ssh", comment=f"imagefactory-check-{work.name}")
    name = f"{CHECK_NAME_PREFIX}{uuid.uuid4().hex[:12]}"
    labels = MANAGED | {ROLE: "check-instance"}
    with log.step(f"launch {name} on {driver.title}"):
        server_id = driver.create_server(name, image_id, check_user_data(key.public_text), labels)
    try:
        started = clock()
        address = _wait_for_address(driver, server_id, LAUNCH_TIMEOUT_S, clock)
        target = SSHTarget(driver.login_user, address, driver.ssh_port, key.private, True)
        timings, state = wait_until_ready(target, started, BOOT_TIMEOUT_S)
        yield Instance(target, [key.public_text], timings, state)
    except BaseException:
        # Destroy, but let the original failure be the one the user sees.
        with contextlib.suppress(Exception), log.step(f"destroy {name} ({server_id})"):
            driver.delete_server(server_id)
        raise
    with log.step(f"destroy {name} ({server_id})"):
        driver.delete_server(server_id)


def _wait_for_address(driver: CloudDriver, server_id: str, timeout: float, clock) -> str:
    deadline = clock() + timeout
    while (address := driver.server_address(server_id)) is None:
        if clock() > deadline:
            raise CloudError(
                f"{driver.title}: server {server_id} not running after {timeout:.0f} s"
            )
        time.sleep(POLL_S)
    return address


def record_verdict(driver: CloudDriver, image_id: str, verdict: Verdict) -> None:
    driver.label_image(image_id, MANAGED | {ROLE: "image", VERDICT: verdict})


def publish(
    driver: CloudDriver, image_id: str, name: str, description: str, keep: int, log: StepLog
) -> list[str]:
    """Publish, label, then keep only the newest ``keep`` published images of this name."""
    where = driver.publish_image(image_id, name, description)
    record_verdict(driver, image_id, "published")
    for old in retired(driver, name, keep, just_published=image_id):
        log.say(f"{driver.title}: retention (keep {keep}): deleting {old.name} ({old.id})")
        driver.delete_image(old.id)
    return where


def retired(
    driver: CloudDriver, name: str, keep: int, just_published: str = ""
) -> list[CloudImage]:
    """Published images of the same image name beyond the newest ``keep``; never the one just
    published (re-publishing an older snapshot must not delete it straight away)."""
    published = driver.images_labelled(MANAGED | {ROLE: "image", VERDICT: "published"})
    mine = sorted((i for i in published if _same_family(i.name, name)), key=_age)
    return [i for i in mine[: max(0, len(mine) - keep)] if i.id != just_published]


def _age(image: CloudImage) -> tuple[str, tuple[int, ...]]:
    """Oldest first: the creation time, then the serial in the name, compared as numbers (an
    API that does not say when an image was made must not rank 20261127.10 before .9)."""
    serial = image.name.rsplit("-", 1)[-1]
    return image.created, tuple(int(part) for part in re.findall(r"\d+", serial))


def _same_family(image_name: str, name: str) -> bool:
    """Published names are <image>-<serial>; the family is everything before the serial."""
    return image_name.rsplit("-", 1)[0] == name.rsplit("-", 1)[0]
