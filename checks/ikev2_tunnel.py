"""ikev2_tunnel: two strongSwan daemons set up an IKEv2 tunnel and carry traffic through it.

Both ends run inside this machine: two network namespaces joined by a veth pair, each with a
small subnet on its loopback. Each end runs the stroke daemon the way strongswan-starter
does (`ipsec start --nofork`), inside its own mount namespace with a tmpfs over /run (and
/var/run when that is not a symlink) and its own ipsec.conf / ipsec.secrets bind-mounted
over /etc, so neither end shares pid files, sockets or configuration with the other or with
a strongSwan already running on the machine. The initiator has auto=start; the check waits
(against a deadline) for the SA, pings through the tunnel and reads the ESP counters.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from checklib import (
    Cleanup,
    Completed,
    Context,
    Result,
    failed,
    log,
    passed,
    run,
    skipped,
    wait_until,
    which,
    with_cleanup_errors,
)

NOT_INSTALLED = "strongSwan not installed (apt-get install strongswan to include the tunnel test)"
CONN = "imagefactory-check"
# Algo's proposals: what a real deployment negotiates.
IKE = "aes256gcm16-prfsha512-ecp384!"
ESP = "aes256gcm16-ecp384!"
ESTABLISH_DEADLINE_S = 90  # charon start + IKE_SA_INIT + IKE_AUTH; 2-8 s under TCG
CHILD_GRACE_S = 15  # IKE SA up but no CHILD SA for this long: the kernel refused it
CHILD_FAILED = r"failed to establish CHILD_SA|no CHILD_SA built"  # ... or charon says so
STOP_TIMEOUT_S = 20
# Each end's charon logs to its own tmpfs (AppArmor lets charon write /run/charon.*).
CHARON_LOG = "/run/charon.imagefactory-check.log"
LOGGING_TARGET = "/etc/strongswan.d/charon-logging.conf"
LOGGING_CONF = f"""# imagefactory's ikev2_tunnel check: this end's charon logs to its private /run.
charon {{
    filelog {{
        imagefactory {{
            path = {CHARON_LOG}
            time_format = %T
            flush_line = yes
            default = 1
        }}
    }}
}}
"""
# What charon logs when the kernel lacks something (FIELD-NOTES "failure signatures"),
# in words a maintainer can act on.
SIGNATURES = (
    (r"unable to create netlink socket", "no XFRM netlink interface (xfrm_user missing)"),
    (
        r"unable to add SAD entry|unable to install (?:inbound|outbound)",
        "the kernel refused the ESP SA (esp4/esp6 or an algorithm missing or blocked)",
    ),
    (r"unable to (?:install|add) (?:IPsec )?polic", "the kernel refused the IPsec policies"),
    (r"unable to create IPv[46] routing table rule", "no policy routing (IP_MULTIPLE_TABLES)"),
    (r"received netlink error: (.+)", "netlink error: {0}"),
    (r"AUTHENTICATION_FAILED|MAC mismatched", "authentication failed (PSK not accepted)"),
    (r"received (\S+) notify, no CHILD_SA built", "the peer refused the CHILD SA ({0})"),
    (r"no acceptable proposal|NO_PROPOSAL_CHOSEN", "no acceptable proposal"),
    (r"failed to establish CHILD_SA", "CHILD SA not established"),
)


@dataclass
class End:
    """One side of the tunnel."""

    role: str  # "initiator" | "responder"
    ns: str
    veth: str
    outer: str  # address on the veth
    inner: str  # address on lo, inside the protected subnet
    subnet: str
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def ident(self) -> str:
        return f"@{self.role}.imagefactory.test"


def ipsec_conf(local: End, remote: End) -> str:
    auto = "start" if local.role == "initiator" else "add"
    return f"""# imagefactory's ikev2_tunnel check: lives only in this end's mount namespace.
config setup
    uniqueids=no

conn {CONN}
    keyexchange=ikev2
    ike={IKE}
    esp={ESP}
    type=tunnel
    left={local.outer}
    leftid={local.ident}
    leftsubnet={local.subnet}
    leftauth=psk
    right={remote.outer}
    rightid={remote.ident}
    rightsubnet={remote.subnet}
    rightauth=psk
    dpdaction=none
    auto={auto}
"""


def ipsec_secrets(local: End, remote: End, psk: str) -> str:
    return f'{local.ident} {remote.ident} : PSK "{psk}"\n'


def esp_counters(listing: str) -> dict[tuple[str, str], tuple[int, int]]:
    """`ip -s xfrm state`: (src, dst) -> (bytes, packets) from each state's
    "lifetime current:" block."""
    counters: dict[tuple[str, str], tuple[int, int]] = {}
    current: tuple[str, str] | None = None
    in_lifetime = False
    for line in listing.splitlines():
        header = re.match(r"src (\S+) dst (\S+)", line)
        if header:
            current, in_lifetime = (header.group(1), header.group(2)), False
            continue
        if line.strip() == "lifetime current:":
            in_lifetime = True
            continue
        amounts = re.match(r"\s*(\d+)\(bytes\), (\d+)\(packets\)", line)
        if in_lifetime and amounts and current:
            counters[current] = (int(amounts.group(1)), int(amounts.group(2)))
            in_lifetime = False
    return counters


def child_state(statusall: str) -> tuple[bool, bool]:
    """(IKE SA established, CHILD SA installed) for our connection."""
    ike = re.search(rf"^\s*{CONN}\[\d+\]: ESTABLISHED", statusall, re.M)
    child = re.search(rf"^\s*{CONN}\{{\d+\}}:\s+INSTALLED, TUNNEL", statusall, re.M)
    return bool(ike), bool(child)


def diagnose(charon_log: str) -> list[tuple[int, str]]:
    """Known failure signatures in a charon log: (rank, words with the first matching log
    line); the lower the rank, the closer to the cause (the order of SIGNATURES)."""
    found: dict[int, str] = {}
    for line in charon_log.splitlines():
        for rank, (pattern, words) in enumerate(SIGNATURES):
            match = re.search(pattern, line)
            if match:
                text = words.format(*match.groups()) if "{0}" in words else words
                found.setdefault(rank, f"{text} [charon: {line.split(']', 1)[-1].strip()}]")
                break
    return sorted(found.items())


def _launch_script(end: End, conf: Path, secrets_file: Path, logging_conf: Path) -> str:
    """What runs inside the fresh mount namespace before the daemon takes over."""
    lines = ["set -e", "mount -t tmpfs -o mode=0755 imagefactory-run /run"]
    if not os.path.islink("/var/run"):
        lines.append("mount -t tmpfs -o mode=0755 imagefactory-varrun /var/run")
    lines += [
        f"mount --bind '{conf}' /etc/ipsec.conf",
        f"mount --bind '{secrets_file}' /etc/ipsec.secrets",
        # Only a diagnostic aid: a packaging without this file just gets no private log.
        f"if [ -e {LOGGING_TARGET} ]; then mount --bind '{logging_conf}' {LOGGING_TARGET}; fi",
        "exec ipsec start --nofork",
    ]
    return "\n".join(lines)


def _inside(end: End, *argv: str, timeout: float = 30) -> Completed:
    """A command in that end's network and mount namespaces (its own /run, its config)."""
    assert end.proc is not None
    return run(["nsenter", "-t", str(end.proc.pid), "-m", "-n", *argv], timeout=timeout)


def _stop(end: End) -> None:
    """Stop the daemon as systemd stops strongswan-starter (SIGTERM to starter, which stops
    charon), then make sure nothing of it is left running. Not `ipsec stop`: it polls the
    starter's pid with kill -0, and our unreaped child would look alive for its 11 s."""
    if end.proc is None:
        return
    if end.proc.poll() is None:
        end.proc.terminate()
        try:
            end.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log(f"the {end.role} did not stop within {STOP_TIMEOUT_S} s: killing it")
            os.killpg(end.proc.pid, signal.SIGKILL)
            end.proc.wait(timeout=10)
    _kill_namespace_processes(end.ns)


def _kill_namespace_processes(ns: str) -> None:
    """Anything still in the namespace (a charon that left the process group) goes too."""
    for pid in run(["ip", "netns", "pids", ns], timeout=10).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _setup_network(a: End, b: End, cleanup: Cleanup) -> str | None:
    """Namespaces, veth pair, addresses, routes. Returns the failure, if any."""
    for end in (a, b):
        done = run(["ip", "netns", "add", end.ns])
        if not done.ok:
            return f"cannot create a network namespace: {done.why()}"
        cleanup.push(f"remove netns {end.ns}", lambda ns=end.ns: run(["ip", "netns", "delete", ns]))
    commands = [
        [
            "ip",
            "link",
            "add",
            a.veth,
            "netns",
            a.ns,
            "type",
            "veth",
            "peer",
            "name",
            b.veth,
            "netns",
            b.ns,
        ],
    ]
    for end, peer in ((a, b), (b, a)):
        commands += [
            ["ip", "-n", end.ns, "link", "set", "lo", "up"],
            ["ip", "-n", end.ns, "link", "set", end.veth, "up"],
            ["ip", "-n", end.ns, "addr", "add", f"{end.outer}/24", "dev", end.veth],
            ["ip", "-n", end.ns, "addr", "add", f"{end.inner}/24", "dev", "lo"],
            # charon installs its own route in table 220; this one is the fallback.
            ["ip", "-n", end.ns, "route", "add", peer.subnet, "via", peer.outer, "src", end.inner],
        ]
    for argv in commands:
        done = run(argv)
        if not done.ok:
            return f"cannot set up the test network: {done.why()}"
    return None


def _start(end: End, peer: End, workdir: Path, psk: str, cleanup: Cleanup) -> None:
    conf = workdir / f"{end.role}.ipsec.conf"
    secrets_file = workdir / f"{end.role}.ipsec.secrets"
    logging_conf = workdir / f"{end.role}.charon-logging.conf"
    logging_conf.write_text(LOGGING_CONF)
    conf.write_text(ipsec_conf(end, peer))
    secrets_file.touch(mode=0o600)
    secrets_file.write_text(ipsec_secrets(end, peer, psk))
    end.log_path = workdir / f"{end.role}.log"
    argv = [
        "ip",
        "netns",
        "exec",
        end.ns,
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        _launch_script(end, conf, secrets_file, logging_conf),
    ]
    log(f"starting the {end.role} in {end.ns}")
    with end.log_path.open("w") as out:
        env = dict(os.environ, LC_ALL="C")
        # Its own session: the whole daemon tree can be killed if `ipsec stop` fails.
        end.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    cleanup.push(f"stop the {end.role}", lambda: _stop(end))


def _log_tail(end: End, lines: int = 5) -> str:
    if end.log_path is None or not end.log_path.exists():
        return ""
    tail = end.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
    return " | ".join(tail)


class Stuck(Exception):
    """Waiting longer cannot help: a daemon died, or the CHILD SA was refused."""


def connection_loaded(statusall: str) -> bool:
    """`ipsec statusall` lists the connection under "Connections:" once starter added it."""
    return re.search(rf"^\s*{CONN}:\s", statusall, re.M) is not None


def _wait_for_connection(end: End) -> str | None:
    def loaded() -> bool:
        if end.proc is not None and end.proc.poll() is not None:
            return True  # reported below
        return connection_loaded(_inside(end, "ipsec", "statusall").stdout)

    if not wait_until(loaded, ESTABLISH_DEADLINE_S, interval=0.5):
        return f"the {end.role} did not load its connection within {ESTABLISH_DEADLINE_S} s"
    if end.proc is not None and end.proc.poll() is not None:
        return f"the {end.role}'s daemon exited: {_log_tail(end)}"
    return None


def _wait_for_sa(a: End, b: End) -> str | None:
    """Wait until both ends have the IKE and CHILD SA; the failure in words otherwise."""
    seen: dict[str, float] = {}  # when the initiator first reported its IKE SA

    def up() -> bool:
        for end in (a, b):
            if end.proc is not None and end.proc.poll() is not None:
                raise Stuck(f"the {end.role}'s daemon exited: {_log_tail(end)}")
        states = [child_state(_inside(end, "ipsec", "statusall").stdout) for end in (a, b)]
        if all(ike and child for ike, child in states):
            return True
        if states[0][0] and not states[0][1]:
            since = seen.setdefault("ike", time.monotonic())
            if re.search(CHILD_FAILED, _inside(a, "cat", CHARON_LOG).stdout):
                raise Stuck("IKE SA established but the CHILD SA (ESP) failed")
            if time.monotonic() - since > CHILD_GRACE_S:
                raise Stuck(f"IKE SA established but no CHILD SA (ESP) after {CHILD_GRACE_S} s")
        return False

    try:
        if wait_until(up, ESTABLISH_DEADLINE_S, interval=1.0):
            return None
        problem = f"no IKEv2 SA within {ESTABLISH_DEADLINE_S} s"
    except Stuck as exc:
        problem = str(exc)
    return f"{problem}: {_charon_says(a, b)}"


def _charon_says(a: End, b: End) -> str:
    """The diagnosis from both charon logs (read while their namespaces still exist), the
    findings closest to the cause first, whichever end logged them."""
    findings = []
    for end in (a, b):
        if end.proc is not None and end.proc.poll() is None:
            text = _inside(end, "cat", CHARON_LOG).stdout
            findings += [(rank, f"{end.role}: {words}") for rank, words in diagnose(text)]
    if findings:
        return "; ".join(words for _, words in sorted(findings)[:3])
    return f"nothing recognisable in charon's logs; starter: {_log_tail(a)}"


def _traffic(a: End, b: End) -> tuple[str | None, dict[str, object]]:
    """Ping through the tunnel, then require ESP packets counted in both directions."""
    ping = run(
        [
            "ip",
            "netns",
            "exec",
            a.ns,
            "ping",
            "-c",
            "3",
            "-i",
            "0.3",
            "-W",
            "3",
            "-I",
            a.inner,
            b.inner,
        ],
        timeout=30,
    )
    counters = esp_counters(run(["ip", "-n", a.ns, "-s", "xfrm", "state"]).stdout)
    out = counters.get((a.outer, b.outer), (0, 0))
    back = counters.get((b.outer, a.outer), (0, 0))
    data: dict[str, object] = {
        "esp_out": {"bytes": out[0], "packets": out[1]},
        "esp_in": {"bytes": back[0], "packets": back[1]},
    }
    rtt = re.search(r"= [\d.]+/([\d.]+)/", ping.stdout)
    if rtt:
        data["ping_avg_ms"] = float(rtt.group(1))
    if not ping.ok:
        return f"SA established but ping {a.inner} -> {b.inner} failed: {ping.why()}", data
    if out[1] == 0 or back[1] == 0:
        return f"ping worked but not through ESP (counters out {out}, in {back})", data
    return None, data


def check(ctx: Context) -> Result:
    if which("ipsec") is None:
        return skipped(NOT_INSTALLED)
    missing = [p for p in ("unshare", "nsenter", "ping", "ip") if which(p) is None]
    if missing:
        return failed(f"cannot run the tunnel test: {', '.join(missing)} not installed")
    tag = os.getpid()
    a = End(
        "initiator", f"ifc-ike-i-{tag}", f"ifc{tag}i", "192.0.2.1", "10.201.1.1", "10.201.1.0/24"
    )
    b = End(
        "responder", f"ifc-ike-r-{tag}", f"ifc{tag}r", "192.0.2.2", "10.201.2.1", "10.201.2.0/24"
    )
    psk = secrets.token_hex(16)
    started = time.monotonic()
    data: dict[str, object] = {"ike": IKE, "esp": ESP}
    with Cleanup() as cleanup:
        problem = _setup_network(a, b, cleanup)
        if problem is None:
            _start(b, a, ctx.workdir, psk, cleanup)
            # The initiator (auto=start) tries once at start-up: a responder still loading
            # its connection answers NO_PROPOSAL_CHOSEN and the tunnel never comes up.
            problem = _wait_for_connection(b)
        if problem is None:
            _start(a, b, ctx.workdir, psk, cleanup)
            problem = _wait_for_sa(a, b)
            data["seconds_to_established"] = round(time.monotonic() - started, 1)
        if problem is None:
            problem, traffic = _traffic(a, b)
            data.update(traffic)
    if problem:
        result = failed(problem, **data)
    else:
        result = passed(
            f"IKEv2 SA up in {data['seconds_to_established']} s; ping through the tunnel, "
            f"ESP out {data['esp_out']['packets']} / in {data['esp_in']['packets']} packets",  # type: ignore[index]
            **data,
        )
    return with_cleanup_errors(result, cleanup.errors)
