"""The provider registry: what differs between providers, as data.

The pipeline never branches on a provider's name; it looks the provider up here.
Later stages (launch for checks, publish) hang their per-provider mechanism on
these same entries.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import clouds, nocloud, qemu
from .clouds import CloudDriver
from .context import BuildRun, BuiltArtifact, Instance
from .definitions import ImageDefinition, ProviderSettings
from .digests import sha256_file
from .errors import ConfigError, PackerError
from .packer import Artifact, GuestWatch
from .records import Record
from .settings import Settings
from .ssh import GuestStoppedError, SSHTarget, wait_until_ready
from .steps import StepLog


@dataclass(frozen=True)
class Provider:
    name: str  # also the Packer builder type and the template's file name
    title: str
    plugin_source: str  # for `required_plugins` on Packer >= 1.7
    # Environment variables that carry credentials. They reach Packer only through
    # its environment; they are never rendered into a file.
    secret_env: tuple[str, ...]
    # Placeholders for credentials absent from the environment, so `packer validate`
    # can check everything it checks offline. Never used for a build.
    validation_env: dict[str, str] = field(default_factory=dict)
    # Packer 1.6.6's openstack builder logs in to the identity service while validating;
    # offline we can only check syntax (the tests also run a full check against a local one).
    offline_validation: str = "full"  # "full" | "syntax-only"
    aliases: tuple[str, ...] = ()
    # The account Packer connects as; an image setting `ssh_username` overrides it.
    build_user: str = "root"

    def build_user_for(self, settings: ProviderSettings) -> str:
        return getattr(settings, "ssh_username", None) or self.build_user

    def validation_variables(self, scratch: Path) -> dict[str, str]:
        """Stand-in values for the build-time variables, enough for `packer validate`."""
        return {
            "serial": "19700101.0",
            "manifest_path": str(scratch / "manifest.json"),
            "report_directory": str(scratch / "report"),
        }

    # Artifacts are files here (their digest can be re-checked), not provider image ids.
    local_artifacts = False

    def prepare_build(self, run: BuildRun) -> dict[str, str]:
        """Provider-specific build-time variables, and the local inputs they point at."""
        return {}

    def build_watch(self, run: BuildRun) -> GuestWatch | None:
        """What tells, while Packer builds, that its guest will never come up (None: Packer's
        own timeouts decide). Called before each attempt."""
        return None

    def instance(
        self, record: Record, image: ImageDefinition, work: Path, cache_dir: Path, log: StepLog
    ) -> contextlib.AbstractContextManager[Instance]:
        """A fresh instance of the artifact, reachable over SSH; destroyed on exit, always.
        Every provider provides it (LocalDiskProvider, CloudProvider)."""
        raise NotImplementedError

    def publish(
        self, record: Record, image: ImageDefinition, settings: Settings, log: StepLog
    ) -> str:
        """Make a certified artifact available to users; returns where it went.
        Only called through the gate (publish.publish_record)."""
        raise NotImplementedError

    def recover(self, image: ImageDefinition, settings: Settings, log: StepLog) -> None:
        """Undo what a killed run left behind (check instances, a half-done publish);
        called at the start of every pipeline run."""

    def record_verdict(self, record: Record, image: ImageDefinition, log: StepLog) -> None:
        """Mark the artifact itself certified or rejected where the provider keeps it."""

    def collect(self, run: BuildRun, artifacts: list[Artifact]) -> BuiltArtifact:
        """The one artifact this build produced; for a cloud, its image id."""
        ids = [a.id for a in artifacts if a.id]
        if len(ids) != 1:
            raise PackerError(f"expected one {self.name} image from Packer, got {ids or 'none'}")
        digest = hashlib.sha256(f"{self.name}:{ids[0]}:{run.serial}".encode()).hexdigest()
        return BuiltArtifact(location=ids[0], sha256=digest, size=0)


@dataclass(frozen=True)
class LocalDiskProvider(Provider):
    """Builds on this machine from a base disk image built from the Ubuntu archive."""

    local_artifacts = True

    def instance(
        self, record: Record, image: ImageDefinition, work: Path, cache_dir: Path, log: StepLog
    ) -> contextlib.AbstractContextManager[Instance]:
        settings = image.provider(self.name)
        return booted_overlay(
            Path(record.artifact), work, cache_dir, log, settings.memory_mb, settings.cpus
        )

    def publish(
        self, record: Record, image: ImageDefinition, settings: Settings, log: StepLog
    ) -> str:
        return str(local_store(settings, log).publish(record, image))

    def recover(self, image: ImageDefinition, settings: Settings, log: StepLog) -> None:
        if settings.store.exists():
            local_store(settings, log).recover()

    def prepare_build(self, run: BuildRun) -> dict[str, str]:
        from .base import build_base  # the archive builder is only needed here

        base = build_base(run.image, run.settings, run.log, refresh=run.refresh_base)
        accelerator = qemu.choose_accelerator(base.path, run.settings.cache_dir, run.log)
        key = nocloud.ephemeral_key(run.work / "ssh", comment=f"imagefactory-build-{run.serial}")
        seed = nocloud.write_seed(
            run.work / "seed",
            instance_id=f"imagefactory-build-{run.serial}",
            hostname="imagefactory-build",
            user_data=nocloud.build_user_data(key.public_text),
        )
        run.provenance |= {
            "base_image_sha256": base.sha256,
            "archive_release_dates": base.release_dates,
            "accelerator": accelerator,
            "qemu_version": qemu.version(),
        }
        return {
            "base_image": str(base.path),
            "base_image_checksum": f"sha256:{base.sha256}",
            "output_directory": str(run.work / "output"),
            "seed_directory": str(seed),
            "ssh_private_key_file": str(key.private),
            "accelerator": accelerator,
        }

    def build_watch(self, run: BuildRun) -> GuestWatch | None:
        # The template's serial console (qemu.pkr.hcl.j2); a new one for each attempt.
        console = run.work / "console.log"
        console.unlink(missing_ok=True)
        return qemu.console_watch(console)

    def collect(self, run: BuildRun, artifacts: list[Artifact]) -> BuiltArtifact:
        disks = sorted({Path(f) for a in artifacts for f in a.files if f.endswith(".qcow2")})
        if len(disks) != 1:
            raise PackerError(f"expected one qcow2 from Packer, got {[str(d) for d in disks]}")
        backing = qemu.info(disks[0]).get("backing-filename")
        if backing:
            raise PackerError(f"{disks[0]}: still backed by {backing}; it must stand alone")
        final = run.directory / f"{run.image.name}-{run.serial}.qcow2"
        shutil.move(disks[0], final)
        return BuiltArtifact(
            location=str(final), sha256=sha256_file(final), size=final.stat().st_size
        )

    def validation_variables(self, scratch: Path) -> dict[str, str]:
        seed = scratch / "seed"
        seed.mkdir(parents=True, exist_ok=True)
        for name in ("meta-data", "user-data"):
            (seed / name).write_text("")
        key = scratch / "id_ed25519"
        if not key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                check=True,
                stdin=subprocess.DEVNULL,
            )
        return super().validation_variables(scratch) | {
            "base_image": str(scratch / "base.qcow2"),
            "base_image_checksum": "sha256:" + "0" * 64,
            "output_directory": str(scratch / "output"),
            "seed_directory": str(seed),
            "ssh_private_key_file": str(key),
            "accelerator": "tcg",
        }


def local_store(settings: Settings, log: StepLog):
    from .store import LocalStore, StoreConfig

    config = StoreConfig(settings.store, settings.keep, settings.signing_key, settings.gnupghome)
    return LocalStore(config, log.say)


@dataclass(frozen=True)
class CloudProvider(Provider):
    """Builds with the cloud's Packer builder; launches, labels and publishes through the
    cloud's API driver (``imagefactory/<driver_module>.py``) with the shared flow in clouds.py."""

    driver_module: str = ""

    def driver(self, image: ImageDefinition) -> CloudDriver:
        module = importlib.import_module(f"{__package__}.{self.driver_module}")
        return module.driver(image.provider(self.name))

    def instance(
        self, record: Record, image: ImageDefinition, work: Path, cache_dir: Path, log: StepLog
    ) -> contextlib.AbstractContextManager[Instance]:
        driver = self.driver(image)
        return clouds.launched(driver, driver.image_id(record.artifact), work, log)

    def record_verdict(self, record: Record, image: ImageDefinition, log: StepLog) -> None:
        driver = self.driver(image)
        verdict = record.state if record.state in ("certified", "published") else "rejected"
        clouds.record_verdict(driver, driver.image_id(record.artifact), verdict)

    def publish(
        self, record: Record, image: ImageDefinition, settings: Settings, log: StepLog
    ) -> str:
        driver = self.driver(image)
        image_id = driver.image_id(record.artifact)
        name = f"{record.image}-{record.serial}"
        description = (
            f"{name}: Ubuntu {image.release} for strongSwan, certified by imagefactory "
            f"(sha256 {record.sha256[:16]}, checks {record.certification.checks_version[:12]})"
            if record.certification
            else name
        )
        where = clouds.publish(driver, image_id, name, description, settings.keep, log)
        return f"{self.title} image {image_id} ({', '.join(where)})"

    def recover(self, image: ImageDefinition, settings: Settings, log: StepLog) -> None:
        clouds.sweep(self.driver(image), log)


# cloud-init's default user on Ubuntu: the account a real first boot creates.
INSTANCE_USER = "ubuntu"
BOOT_TIMEOUT_S = 900.0


@contextlib.contextmanager
def booted_overlay(
    disk: Path, work: Path, cache_dir: Path, log: StepLog, memory_mb: int = 2048, cpus: int = 2
) -> Iterator[Instance]:
    """A fresh copy-on-write instance of ``disk``, booted as a cloud would boot it (a new
    instance id, this boot's key for the default user), ready; gone on exit.

    Under TCG a kernel can panic while it patches its own code (an emulator race: measured
    once in 26.04's kernel 7.0, `Oops: int3` in sched_clock_cpu at 4.7 s); such a boot gets
    one fresh retry, and the panic stays in the evidence. Under KVM a panic is the image's."""
    accelerator = qemu.choose_accelerator(disk, cache_dir, log)
    earlier: list[str] = []
    while True:
        attempt = work / f"boot-{len(earlier) + 1}"
        stack = contextlib.ExitStack()
        try:
            instance = _boot(stack, disk, attempt, accelerator, log, memory_mb, cpus)
        except GuestStoppedError as exc:
            stack.close()
            if accelerator != "tcg" or earlier or not exc.reason.startswith(qemu.PANICKED):
                raise
            earlier.append(f"boot {len(earlier) + 1}: {exc.reason}")
            log.say(f"warning: {exc}; booting a fresh overlay once more")
            continue
        except BaseException:
            stack.close()
            raise
        instance.earlier_boots = earlier
        with stack:
            yield instance
        return


def _boot(
    stack: contextlib.ExitStack,
    disk: Path,
    work: Path,
    accelerator: str,
    log: StepLog,
    memory_mb: int,
    cpus: int,
) -> Instance:
    key = nocloud.ephemeral_key(work / "ssh", comment=f"imagefactory-check-{work.parent.name}")
    seed = nocloud.write_seed(
        work / "seed",
        instance_id=f"imagefactory-check-{uuid.uuid4()}",
        hostname="imagefactory-check",
        user_data=nocloud.instance_user_data(key.public_text),
    )
    iso = qemu.make_seed_iso(seed, work / "seed.iso")
    stack.enter_context(log.step("boot a fresh overlay"))
    vm = stack.enter_context(qemu.boot_overlay(disk, work, iso, accelerator, memory_mb, cpus))
    target = SSHTarget(INSTANCE_USER, "127.0.0.1", vm.ssh_port, key.private, True)
    timings, state = wait_until_ready(target, vm.started, BOOT_TIMEOUT_S, vm.stopped)
    log.say(
        f"ready: ssh {timings['ssh']:.0f} s, cloud-init {timings['cloud_init']:.0f} s, "
        f"systemd {timings['system_ready']:.0f} s ({state})"
    )
    return Instance(target, [key.public_text], timings, state)


_FAKE_UUID = "00000000-0000-4000-8000-000000000000"

PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        LocalDiskProvider(
            name="qemu",
            title="QEMU (local)",
            plugin_source="github.com/hashicorp/qemu",
            secret_env=(),
            aliases=("local",),
            # Root, with this build's key only: no build account exists to be left behind.
            build_user="root",
        ),
        CloudProvider(
            name="digitalocean",
            title="DigitalOcean",
            plugin_source="github.com/digitalocean/digitalocean",
            secret_env=("DIGITALOCEAN_API_TOKEN",),
            validation_env={"DIGITALOCEAN_API_TOKEN": "placeholder-for-validation"},
            aliases=("do",),
            driver_module="digitalocean",
        ),
        CloudProvider(
            name="amazon-ebs",
            title="Amazon EC2",
            plugin_source="github.com/hashicorp/amazon",
            secret_env=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"),
            validation_env={
                "AWS_ACCESS_KEY_ID": "AKIAPLACEHOLDER00000",
                "AWS_SECRET_ACCESS_KEY": "placeholder-for-validation",
            },
            aliases=("ec2", "aws"),
            build_user="ubuntu",
            driver_module="ec2",
        ),
        CloudProvider(
            name="azure-arm",
            title="Microsoft Azure",
            plugin_source="github.com/hashicorp/azure",
            secret_env=(
                "ARM_CLIENT_ID",
                "ARM_CLIENT_SECRET",
                "ARM_SUBSCRIPTION_ID",
                "ARM_TENANT_ID",
            ),
            validation_env={
                "ARM_CLIENT_ID": _FAKE_UUID,
                "ARM_CLIENT_SECRET": "placeholder-for-validation",
                "ARM_SUBSCRIPTION_ID": _FAKE_UUID,
                "ARM_TENANT_ID": _FAKE_UUID,
            },
            aliases=("azure",),
            build_user="packer",
            driver_module="azure",
        ),
        CloudProvider(
            name="googlecompute",
            title="Google Compute Engine",
            plugin_source="github.com/hashicorp/googlecompute",
            secret_env=("GOOGLE_APPLICATION_CREDENTIALS",),
            validation_env={"GOOGLE_PROJECT": "placeholder-project"},
            aliases=("gce", "gcp"),
            build_user="ubuntu",
            driver_module="gce",
        ),
        CloudProvider(
            name="hcloud",
            title="Hetzner Cloud",
            plugin_source="github.com/hetznercloud/hcloud",
            secret_env=("HCLOUD_TOKEN",),
            validation_env={"HCLOUD_TOKEN": "placeholder-for-validation"},
            aliases=("hetzner",),
            driver_module="hcloud",
        ),
        CloudProvider(
            name="scaleway",
            title="Scaleway",
            plugin_source="github.com/scaleway/scaleway",
            secret_env=("SCW_ACCESS_KEY", "SCW_SECRET_KEY", "SCW_DEFAULT_PROJECT_ID"),
            validation_env={
                "SCW_ACCESS_KEY": "SCWPLACEHOLDER000000",
                "SCW_SECRET_KEY": _FAKE_UUID,
                "SCW_DEFAULT_PROJECT_ID": _FAKE_UUID,
            },
            driver_module="scaleway",
        ),
        CloudProvider(
            name="openstack",
            title="OpenStack",
            plugin_source="github.com/hashicorp/openstack",
            secret_env=("OS_AUTH_URL", "OS_USERNAME", "OS_PASSWORD", "OS_PROJECT_NAME"),
            offline_validation="syntax-only",
            build_user="ubuntu",
            driver_module="openstack",
        ),
    )
}


def get_provider(name: str) -> Provider:
    for provider in PROVIDERS.values():
        if name == provider.name or name in provider.aliases:
            return provider
    raise ConfigError(f"unknown provider {name!r} (available: {', '.join(PROVIDERS)})")


def select_providers(names: list[str] | None) -> list[Provider]:
    """The providers named (aliases included), each once, in the order first named."""
    if not names:
        return list(PROVIDERS.values())
    chosen: dict[str, Provider] = {}
    for name in names:
        provider = get_provider(name)
        chosen.setdefault(provider.name, provider)
    return list(chosen.values())
