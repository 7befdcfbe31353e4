"""xfrm: the kernel really does IPsec — ESP states, policies, policy routing, PF_KEY.

Everything happens in a throwaway network namespace, so the machine's own IPsec state (a
running strongSwan) is untouched. Adding a state makes the kernel autoload what it needs
(esp4, esp6, the crypto algorithms) exactly as it would for charon, so a blacklisted or
missing module shows up here as the error charon would log.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from checklib import (
    Cleanup,
    Completed,
    Context,
    Result,
    failed,
    passed,
    read_text,
    run,
    with_cleanup_errors,
)

# Throwaway keys: the states never carry traffic.
_KEY_GCM = "0x" + "11" * 20  # AES-128 key + 4-byte salt (RFC 4106)
_KEY_AES = "0x" + "22" * 16
_KEY_SHA256 = "0x" + "33" * 32
V4 = ("192.0.2.1", "192.0.2.2")  # TEST-NET-1
V6 = ("2001:db8::1", "2001:db8::2")  # documentation prefix
AF_KEY, PF_KEY_V2 = 15, 2


@dataclass(frozen=True)
class Step:
    label: str  # what a human calls it
    args: tuple[str, ...]  # `ip -n <ns> ...`
    cleanup: tuple[str, ...] = ()  # how to undo it (also tested: deletion must work)


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def _state(spi: str, src: str, dst: str, *algorithm: str) -> tuple[str, ...]:
    head = f"xfrm state add src {src} dst {dst} proto esp spi {spi} reqid 1 mode tunnel"
    return (*_words(head), *algorithm)


def _delete(spi: str, src: str, dst: str) -> tuple[str, ...]:
    return _words(f"xfrm state delete src {src} dst {dst} proto esp spi {spi}")


GCM = ("aead", "rfc4106(gcm(aes))", _KEY_GCM, "128")
CBC_SHA256 = ("enc", "cbc(aes)", _KEY_AES, "auth-trunc", "hmac(sha256)", _KEY_SHA256, "128")
NAT_T = _words("encap espinudp 4500 4500 0.0.0.0")
POLICY = "src 10.201.1.0/24 dst 10.201.2.0/24 dir out"
TEMPLATE = f"tmpl src {V4[0]} dst {V4[1]} proto esp reqid 1 mode tunnel"
RULE = "rule {} from all lookup 220 priority 220"  # strongSwan's routing table and priority

STEPS = (
    Step("ESP state with AES-GCM (rfc4106(gcm(aes)))",
         _state("0x1001", *V4, *GCM), _delete("0x1001", *V4)),
    Step("ESP state with AES-CBC + HMAC-SHA256",
         _state("0x1002", *V4, *CBC_SHA256), _delete("0x1002", *V4)),
    Step("IPv6 ESP state (AES-GCM)", _state("0x1003", *V6, *GCM), _delete("0x1003", *V6)),
    Step("UDP-encapsulated ESP state (espinudp, port 4500)",
         _state("0x1004", *V4, *GCM, *NAT_T), _delete("0x1004", *V4)),
    Step("IPsec policy", _words(f"xfrm policy add {POLICY} {TEMPLATE}"),
         _words(f"xfrm policy delete {POLICY}")),
    Step("IPv4 policy-routing rule (table 220)",
         _words("-4 " + RULE.format("add")), _words("-4 " + RULE.format("delete"))),
    Step("IPv6 policy-routing rule (table 220)",
         _words("-6 " + RULE.format("add")), _words("-6 " + RULE.format("delete"))),
)  # fmt: skip


def explain(label: str, stderr: str) -> str:
    """The kernel's terse answer in words a maintainer can act on (the signatures charon
    logs for the same faults are in FIELD-NOTES: "Protocol not supported" and friends)."""
    text = stderr.lower()
    if "netlink socket" in text or ("protocol not supported" in text and "cannot open" in text):
        return "the kernel has no XFRM netlink interface (xfrm_user missing or blocked)"
    if "rule" in label:
        if "address family not supported" in text and "ipv6" in label.lower():
            return "IPv6 is disabled in this kernel"
        return "no policy routing (IP_MULTIPLE_TABLES / IPV6_MULTIPLE_TABLES) in this kernel"
    if "protocol not supported" in text:
        family = "esp6" if "ipv6" in label.lower() else "esp4"
        return f"the kernel cannot create ESP states ({family} missing or blocked from loading)"
    if "function not implemented" in text or "no such file or directory" in text:
        return "the algorithm is not available (crypto module missing or blocked from loading)"
    if "address family not supported" in text:
        return "IPv6 is disabled in this kernel"
    if "espinudp" in label or "udp" in label.lower():
        return "UDP encapsulation of ESP (NAT traversal) is not supported"
    return "the kernel refused it"


def count_entries(listing: str) -> int:
    """Entries in `ip xfrm state|policy list` output: each starts with an unindented line."""
    return sum(1 for line in listing.splitlines() if line and not line[0].isspace())


def pfkey_works() -> tuple[bool, str, bool]:
    """Open a PF_KEY socket (loading af_key as strongSwan's unit would need it) and look
    for /proc/net/pfkey. Returns (ok, why, loaded_by_us)."""
    before = Path("/proc/net/pfkey").exists()
    try:
        sock = socket.socket(AF_KEY, socket.SOCK_RAW, PF_KEY_V2)
    except OSError as exc:
        why = f"cannot open a PF_KEY socket: {exc.strerror} (af_key missing or blocked)"
        return False, why, False
    with sock:
        present = Path("/proc/net/pfkey").exists()
    if not present:
        return False, "PF_KEY socket opened but /proc/net/pfkey is missing", not before
    return True, "", not before


def _ip(ns: str, args: tuple[str, ...]) -> Completed:
    return run(["ip", "-n", ns, *args], timeout=30)


def exercise(ns: str, cleanup: Cleanup) -> tuple[list[str], list[str]]:
    """Run every step, undoing each right after it worked (the undo is tested too).
    Returns (what worked, what failed with the reason)."""
    worked, problems = [], []
    for step in STEPS:
        done = _ip(ns, step.args)
        if not done.ok:
            problems.append(f"{step.label}: {explain(step.label, done.stderr)} ({done.why()})")
            continue
        undone = _ip(ns, step.cleanup)
        if not undone.ok:
            cleanup.errors.append(f"undo {step.label}: {undone.why()}")
        worked.append(step.label)
    return worked, problems


def check(ctx: Context) -> Result:
    ns = f"ifc-xfrm-{os.getpid()}"
    with Cleanup() as cleanup:
        added = run(["ip", "netns", "add", ns], timeout=30)
        if not added.ok:
            return failed(f"cannot create a network namespace: {added.why()}")
        cleanup.push(f"remove netns {ns}", lambda: run(["ip", "netns", "delete", ns]))
        _ip(ns, ("link", "set", "lo", "up"))
        worked, problems = exercise(ns, cleanup)
        left = count_entries(_ip(ns, ("xfrm", "state", "list")).stdout)
        left += count_entries(_ip(ns, ("xfrm", "policy", "list")).stdout)
        if left:
            cleanup.errors.append(f"{left} XFRM states/policies were still there after deletion")
        ok, why, loaded_by_us = pfkey_works()
        if loaded_by_us:
            # Leave the machine as found: strongswan_service judges whether af_key loads at boot.
            cleanup.push("unload af_key", lambda: run(["modprobe", "-r", "af_key"]))
        if not ok:
            problems.append(f"PF_KEY (af_key): {why}")
        crypto = read_text("/proc/crypto", "") or ""
        data = {
            "worked": worked,
            "pfkey": ok,
            "af_key_loaded_by_check": loaded_by_us,
            "proc_crypto_rfc4106": "rfc4106(gcm(aes))" in crypto,
        }
    if problems:
        result = failed("; ".join(problems), **data)
    else:
        result = passed(f"{len(worked)} XFRM operations and PF_KEY work", **data)
    return with_cleanup_errors(result, cleanup.errors)
