"""environment: is this a virtual machine with its own kernel, or a container?

Containers (Docker, LXC, systemd-nspawn) and OpenVZ share the host's kernel and cannot load
modules; strongSwan would need kernel-libipsec there, which Algo does not support (a copy of
every packet in memory, unaudited code). That is a verdict on the provider, not the image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from checklib import Context, Result, failed, passed, read_text, run

UNSUPPORTED = (
    "unsupported: kernel modules cannot be loaded here; "
    "userspace IPsec (kernel-libipsec) is not supported"
)


@dataclass
class Signs:
    """What the machine says about itself."""

    container: str | None  # systemd-detect-virt --container, None when it says "none"
    openvz: bool  # /proc/vz (OpenVZ/Virtuozzo) without /proc/bc being a host node's
    pid1_container: str | None  # container= in PID 1's environment
    modules_dir: bool  # /lib/modules/$(uname -r) exists
    virtualization: str  # systemd-detect-virt: kvm, qemu, xen, microsoft, none, ...
    kernel: str


def pid1_container(environ: bytes) -> str | None:
    """The container= variable container managers put into PID 1's environment."""
    for entry in environ.split(b"\0"):
        if entry.startswith(b"container="):
            return entry.split(b"=", 1)[1].decode(errors="replace") or None
    return None


def judge(signs: Signs) -> Result:
    reasons = []
    if signs.container:
        reasons.append(f"container ({signs.container}) detected by systemd-detect-virt")
    if signs.openvz:
        reasons.append("OpenVZ/Virtuozzo container (/proc/vz)")
    if signs.pid1_container and not signs.container:
        reasons.append(f"PID 1 runs with container={signs.pid1_container}")
    if not signs.modules_dir:
        reasons.append(f"no /lib/modules/{signs.kernel} for the running kernel")
    data = {
        "virtualization": signs.virtualization,
        "container": signs.container,
        "kernel": signs.kernel,
    }
    if reasons:
        return failed(f"{'; '.join(reasons)}: {UNSUPPORTED}", **data)
    kind = "bare metal" if signs.virtualization == "none" else signs.virtualization
    return passed(f"virtual machine ({kind}) with its own kernel {signs.kernel}", **data)


def detect_virt(*flags: str) -> str | None:
    done = run(["systemd-detect-virt", *flags], timeout=20)
    answer = done.stdout.strip()
    return answer if answer and answer != "none" else None


def gather() -> Signs:
    kernel = os.uname().release
    try:
        environ = Path("/proc/1/environ").read_bytes()
    except OSError:
        environ = b""
    # /proc/vz also exists on an OpenVZ host node, which has /proc/bc as well.
    openvz = Path("/proc/vz").exists() and not Path("/proc/bc").exists()
    return Signs(
        container=detect_virt("--container"),
        openvz=openvz,
        pid1_container=pid1_container(environ),
        modules_dir=Path("/lib/modules", kernel).is_dir(),
        virtualization=detect_virt() or "none",
        kernel=kernel,
    )


def cpu_flags() -> set[str]:
    for line in (read_text("/proc/cpuinfo", "") or "").splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def check(ctx: Context) -> Result:
    result = judge(gather())
    # Facts a maintainer assessing a provider wants next to the verdict.
    flags = cpu_flags()
    result.data.update(
        cpus=os.cpu_count(),
        cpu_aes=("aes" in flags),
        cpu_pclmulqdq=("pclmulqdq" in flags),
        arch=os.uname().machine,
    )
    return result
