"""Image definitions: ``images/<name>.yaml`` loaded into frozen, validated models.

The schema is strict on purpose: an unknown key is far more often a typo than an
extension, and a typo in a purge list or a check expectation would silently build
an image that was never meant to exist.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

# Every name pattern is matched whole (fullmatch): `$` would let a trailing newline through,
# and these values end up in shell scripts, HCL and apt's configuration.
FINGERPRINT = re.compile(r"[0-9A-F]{40}")
PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")
UNIT_NAME = re.compile(r"[A-Za-z0-9@_.-]+\.?(service)?")
ENABLEABLE_UNIT = re.compile(r"[A-Za-z0-9@_.-]+\.(service|timer|socket)")
MASKABLE_UNIT = re.compile(r"[A-Za-z0-9@_.-]+\.(service|timer|socket|mount|path)")
# A kernel module as modprobe names it; a cloud-init module as cloud.cfg lists it.
MODULE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
CLOUD_INIT_MODULE = re.compile(r"[a-z0-9_]{1,64}")
# An AppArmor profile as strongSwan's packages name theirs: the confined program's path.
PROFILE_NAME = re.compile(r"/[A-Za-z0-9_./+-]+")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _fingerprints(values: list[str]) -> list[str]:
    normalised = [v.replace(" ", "").upper() for v in values]
    for raw, fpr in zip(values, normalised, strict=True):
        if not FINGERPRINT.fullmatch(fpr):
            raise ValueError(f"{raw!r} is not a full 40-hex-digit OpenPGP fingerprint")
    return normalised


def _each_name(pattern: re.Pattern[str], what: str) -> Callable[[list[str]], list[str]]:
    """A list validator: every item matches ``pattern`` whole, else '<item> is not <what>'."""

    def check(values: list[str]) -> list[str]:
        for value in values:
            if not pattern.fullmatch(value):
                raise ValueError(f"{value!r} is not {what}")
        return values

    return check


_package_names = _each_name(PACKAGE_NAME, "a Debian package name")


# --- sources of the base image --------------------------------------------------------


class ArchiveBase(Strict):
    """A base built from the Ubuntu archive the way the cloud images are (mmdebstrap)."""

    mirror: str = "http://archive.ubuntu.com/ubuntu"
    pockets: list[str] = Field(min_length=1)
    components: list[str] = ["main", "universe"]
    keyring_fingerprints: list[str] = Field(min_length=1)
    packages: list[str] = Field(min_length=1)
    # Default: linux-image-<kernel_flavour>.
    kernel_package: str | None = None
    disk_size: str = "4G"
    # dpkg path filters (dpkg --path-exclude/--path-include), in order.
    path_exclude: list[str] = []
    path_include: list[str] = []
    # Units the packages leave disabled but the release's cloud images run (systemctl enable).
    enable_units: list[str] = []

    _fpr = field_validator("keyring_fingerprints")(_fingerprints)
    _pkgs = field_validator("packages")(_package_names)

    _units = field_validator("enable_units")(
        _each_name(ENABLEABLE_UNIT, "a systemd unit name like systemd-networkd.service")
    )

    @field_validator("disk_size")
    @classmethod
    def _size(cls, value: str) -> str:
        if not re.fullmatch(r"[1-9][0-9]*[MG]", value):
            raise ValueError(f"{value!r} is not a size like 4G or 3500M")
        return value


class CloudImageBase(Strict):
    """Ubuntu's published cloud image, verified by SHA256SUMS and its GPG signature."""

    url: str
    sha256sums_url: str
    signature_url: str
    keyring_fingerprints: list[str] = Field(min_length=1)

    _fpr = field_validator("keyring_fingerprints")(_fingerprints)


class BaseSources(Strict):
    archive: ArchiveBase
    cloud_image: CloudImageBase | None = None


# --- per-provider base image references and build settings ----------------------------


class ProviderSettings(Strict):
    # The kernel the provider's base image runs; checks compare against it.
    kernel_flavour: str | None = None


class QemuSettings(ProviderSettings):
    source: Literal["archive", "cloud_image"] = "archive"
    memory_mb: int = Field(default=2048, ge=512, le=16384)
    cpus: int = Field(default=2, ge=1, le=64)


class DigitalOceanSettings(ProviderSettings):
    image: str
    region: str = "nyc3"
    size: str = "s-1vcpu-1gb"
    # Publishing transfers the certified snapshot to these regions too (besides `region`).
    publish_regions: list[str] = []


class AmazonSettings(ProviderSettings):
    owner: str
    name_filter: str
    region: str = "us-east-1"
    instance_type: str = "t3.micro"
    ssh_username: str = "ubuntu"
    # Publishing: CopyImage to these regions, then share with these account IDs.
    publish_regions: list[str] = []
    launch_permissions: list[Annotated[str, Field(pattern=r"^[0-9]{12}$")]] = []
    # The check instance's network; empty means the account's default VPC and group.
    security_group_ids: list[str] = []
    subnet_id: str = ""


class AzureSettings(ProviderSettings):
    publisher: str
    offer: str
    sku: str
    location: str = "eastus"
    vm_size: str = "Standard_B1s"
    resource_group: str = "algo-images"
    # The check VM's admin user: cloud-init's default user, the one account hygiene allows.
    admin_username: str = "ubuntu"
    # Publishing: an image version in this Azure Compute Gallery (its image definition must
    # exist); empty: publishing tags the managed image only.
    gallery: str = ""
    gallery_image: str = ""  # the gallery's image definition; default: the image's name
    publish_regions: list[str] = []  # replicas besides `location`


class GoogleSettings(ProviderSettings):
    family: str
    image_project: str
    zone: str = "us-central1-a"
    machine_type: str = "e2-small"
    ssh_username: str = "ubuntu"
    # Publishing: the family the image joins (empty: the image's name, e.g. ubuntu-20-04;
    # older images in it are deprecated) and who may use it (roles/compute.imageUser).
    image_family: str = ""
    publish_members: list[str] = []


class HetznerSettings(ProviderSettings):
    image: str
    location: str = "fsn1"
    server_type: str = "cx11"


class ScalewaySettings(ProviderSettings):
    image: str
    zone: str = "fr-par-1"
    commercial_type: str = "DEV1-S"


class OpenStackSettings(ProviderSettings):
    image_name: str
    flavor: str = "m1.small"
    networks: list[str] = []
    ssh_username: str = "ubuntu"


class Providers(Strict):
    qemu: QemuSettings | None = None
    digitalocean: DigitalOceanSettings | None = None
    amazon_ebs: AmazonSettings | None = Field(default=None, alias="amazon-ebs")
    azure_arm: AzureSettings | None = Field(default=None, alias="azure-arm")
    googlecompute: GoogleSettings | None = None
    hcloud: HetznerSettings | None = None
    scaleway: ScalewaySettings | None = None
    openstack: OpenStackSettings | None = None

    def get(self, provider: str) -> ProviderSettings | None:
        return getattr(self, provider.replace("-", "_"), None)

    def names(self) -> list[str]:
        return [
            (field.alias or name)
            for name, field in type(self).model_fields.items()
            if getattr(self, name) is not None
        ]


# --- what the image carries ----------------------------------------------------------


class Packages(Strict):
    install: list[str] = Field(min_length=1)
    purge: list[str] = []
    # Pinned to priority -1 so that no dependency can bring them back.
    pin_away: list[str] = []

    _install = field_validator("install", "purge", "pin_away")(_package_names)

    @model_validator(mode="after")
    def _disjoint(self) -> Packages:
        both = sorted(set(self.install) & (set(self.purge) | set(self.pin_away)))
        if both:
            raise ValueError(f"{', '.join(both)} cannot be both installed and purged/pinned away")
        return self


class Service(Strict):
    """The strongSwan service fix: which unit runs charon, and what it needs at boot."""

    unit: str
    load_modules: list[str] = []

    @field_validator("unit")
    @classmethod
    def _unit(cls, value: str) -> str:
        if not UNIT_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a systemd unit name")
        return value.removesuffix(".service")

    _modules = field_validator("load_modules")(
        _each_name(MODULE_NAME, "a kernel module name like af_key")
    )


class Boot(Strict):
    """What a VPN server need not do at boot: cloud-init modules it never uses (skipped from the
    installed cloud.cfg's lists, so the rest stays as the release ships it), units to mask, and
    cloud-init's four stages run by one Python process instead of four (cloud-init's own
    single-process mode, shipped but left off by the release's package)."""

    skip_cloud_init_modules: list[str] = []
    mask_units: list[str] = []
    cloud_init_single_process: bool = False

    _units = field_validator("mask_units")(
        _each_name(MASKABLE_UNIT, "a systemd unit name like e2scrub_reap.service")
    )
    _cloud_init_modules = field_validator("skip_cloud_init_modules")(
        _each_name(CLOUD_INIT_MODULE, "a cloud-init module name like ubuntu_pro")
    )


# The stage units hand their stage to the one process over Unix datagram sockets with it.
SINGLE_PROCESS_NEEDS = "netcat-openbsd"


class KernelModulesCheck(Strict):
    required: list[str] = Field(min_length=1)
    optional: list[str] = []


class EmptyCheck(Strict):
    """A check that takes its expectations from the rest of the image definition."""


class AppArmorCheck(Strict):
    """strongSwan's own AppArmor profiles in this release's packages: each must be loaded in
    enforce mode, and each daemon in ``confined`` must run under its profile."""

    enforce: list[str] = Field(min_length=1)
    confined: list[str] = []

    @field_validator("enforce", "confined")
    @classmethod
    def _profiles(cls, values: list[str]) -> list[str]:
        for value in values:
            if not PROFILE_NAME.fullmatch(value):
                raise ValueError(
                    f"{value!r} is not an AppArmor profile name like /usr/lib/ipsec/charon"
                )
        return values

    @model_validator(mode="after")
    def _confined_are_enforced(self) -> AppArmorCheck:
        stray = [name for name in self.confined if name not in self.enforce]
        if stray:
            raise ValueError(f"confined {', '.join(stray)} must also be listed in enforce")
        return self


class UpdatesCheck(Strict):
    """Security updates arrive between rebuilds and the clock is right (IKE certificates)."""

    # The release's time-sync daemon: systemd-timesyncd, or chrony from 26.04.
    time_sync: str

    @field_validator("time_sync")
    @classmethod
    def _unit(cls, value: str) -> str:
        if not UNIT_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a systemd unit name")
        return value.removesuffix(".service")


class Checks(Strict):
    environment: EmptyCheck | None = None
    release: EmptyCheck | None = None
    kernel_modules: KernelModulesCheck | None = None
    xfrm: EmptyCheck | None = None
    ikev2_tunnel: EmptyCheck | None = None
    snapd: EmptyCheck | None = None
    strongswan_service: EmptyCheck | None = None
    boot: EmptyCheck | None = None
    apparmor: AppArmorCheck | None = None
    updates: UpdatesCheck | None = None
    parity: EmptyCheck | None = None
    hygiene: EmptyCheck | None = None

    def enabled(self) -> list[str]:
        return [name for name in type(self).model_fields if getattr(self, name) is not None]


class LeftOut(Strict):
    """Packages of Ubuntu's own image that this one leaves out, and why (one line)."""

    reason: str = Field(min_length=1)
    packages: list[str] = Field(min_length=1)

    _pkgs = field_validator("packages")(_package_names)

    @field_validator("reason")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if not value.isprintable():
            raise ValueError("must be one line of printable text")
        return value


class Parity(Strict):
    """Ubuntu's cloud image of the release, as its seeds (the archive's metapackages named in
    ``reference``) list it: what this image carries of it, and what it leaves out on purpose.
    The build records the metapackages' Depends and Recommends; the parity check holds the
    booted image to them (packages.purge counts as left out, its reason is the purge)."""

    reference: list[str] = Field(min_length=1)
    left_out: list[LeftOut] = []

    _refs = field_validator("reference")(_package_names)

    @model_validator(mode="after")
    def _once(self) -> Parity:
        seen: dict[str, int] = {}
        for group in self.left_out:
            for name in group.packages:
                seen[name] = seen.get(name, 0) + 1
        twice = sorted(name for name, count in seen.items() if count > 1)
        if twice:
            raise ValueError(f"left_out names {', '.join(twice)} more than once")
        return self

    def reasons(self) -> dict[str, str]:
        return {name: group.reason for group in self.left_out for name in group.packages}


class ImageDefinition(Strict):
    name: str
    release: str
    codename: str
    kernel_flavour: str
    packages: Packages
    service: Service
    boot: Boot = Boot()
    base: BaseSources
    providers: Providers
    parity: Parity | None = None
    checks: Checks

    @field_validator("release")
    @classmethod
    def _release(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9]{2}\.(04|10)", value):
            raise ValueError(f"{value!r} is not an Ubuntu release like 20.04")
        return value

    @field_validator("name", "codename")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", value):
            raise ValueError(f"{value!r} may hold only lowercase letters, digits, '.' and '-'")
        return value

    @model_validator(mode="after")
    def _pockets_of_the_release(self) -> ImageDefinition:
        pattern = re.compile(
            rf"{re.escape(self.codename)}(-(updates|security|backports|proposed))?"
        )
        strays = [p for p in self.base.archive.pockets if not pattern.fullmatch(p)]
        if strays:
            raise ValueError(
                f"base.archive.pockets: {', '.join(strays)} not a pocket of {self.codename} "
                f"(allowed: {self.codename}, {self.codename}-updates, {self.codename}-security, "
                f"{self.codename}-backports, {self.codename}-proposed)"
            )
        return self

    @model_validator(mode="after")
    def _parity_has_a_reference(self) -> ImageDefinition:
        if self.checks.parity is not None and self.parity is None:
            raise ValueError("checks.parity needs a parity section (reference, left_out)")
        return self

    @model_validator(mode="after")
    def _single_process_tools(self) -> ImageDefinition:
        needs = SINGLE_PROCESS_NEEDS
        if self.boot.cloud_init_single_process and needs not in self.packages.install:
            raise ValueError(f"boot.cloud_init_single_process needs {needs} in packages.install")
        return self

    def provider(self, name: str) -> ProviderSettings:
        settings = self.providers.get(name)
        if settings is None:
            raise ConfigError(
                f"image {self.name} has no settings for provider {name} "
                f"(it defines: {', '.join(self.providers.names())})"
            )
        return settings

    def kernel_flavour_on(self, provider: str) -> str:
        return self.provider(provider).kernel_flavour or self.kernel_flavour


# --- loading -------------------------------------------------------------------------


def _allowed_keys(model: type[BaseModel] | None) -> str:
    if model is None:
        return ""
    names = [field.alias or name for name, field in model.model_fields.items()]
    return f" (allowed: {', '.join(names)})"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model that owns the mapping at ``loc`` (for listing its allowed keys)."""
    model: type[BaseModel] | None = ImageDefinition
    for part in loc:
        if model is None or not isinstance(part, str):
            return model
        field = next(
            (f for n, f in model.model_fields.items() if part in (n, f.alias)),
            None,
        )
        if field is None:
            return model
        model = _inner_model(field.annotation)
    return model


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def describe_validation_error(path: Path, error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        loc = tuple(item["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown key{_allowed_keys(_model_at(loc[:-1]))}")
        elif item["type"] == "missing":
            problems.append(f"{where}: required field is missing")
        else:
            message = item["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message} (got {item.get('input')!r})")
    return f"{path}: " + "; ".join(problems)


class DefinitionLoader(yaml.SafeLoader):
    """YAML as a maintainer writes a definition: no aliases (a few lines of nested ones
    expand to gigabytes, and nothing here needs them) and no key given twice."""

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.MarkedYAMLError(
                problem="aliases (*name) are not allowed in an image definition; "
                "write the value out",
                problem_mark=mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.MarkedYAMLError(
                    problem=f"key {str(key)[:60]!r} is given twice",
                    problem_mark=key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_image(path: Path) -> ImageDefinition:
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=DefinitionLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such image definition") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not an image definition") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{where}: malformed YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    try:
        image = ImageDefinition.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(path, exc)) from None
    if image.name != path.stem:
        raise ConfigError(f"{path}: name: {image.name!r} must match the file name {path.stem!r}")
    return image


def available_images(images_dir: Path) -> list[str]:
    return sorted(p.stem for p in images_dir.glob("*.yaml"))


def select_images(images_dir: Path, names: list[str] | None) -> list[ImageDefinition]:
    """Load the named images (all when ``names`` is empty), refusing unknown names."""
    known = available_images(images_dir)
    wanted = names or known
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ConfigError(
            f"unknown image {', '.join(unknown)} (available in {images_dir}: {', '.join(known)})"
        )
    return [load_image(images_dir / f"{name}.yaml") for name in wanted]
