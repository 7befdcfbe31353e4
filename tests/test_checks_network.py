"""checks/xfrm.py and checks/ikev2_tunnel.py: what they run and how they read the answers,
against output recorded from a real tunnel in a focal guest (tests/data/ike/record.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .guest import guest_module

ROOT = Path(__file__).resolve().parents[1]
IKE = ROOT / "tests" / "data" / "ike"


xfrm = guest_module("xfrm")
ike = guest_module("ikev2_tunnel")


# --- xfrm ------------------------------------------------------------------------------


def test_the_steps_cover_what_strongswan_needs() -> None:
    commands = [" ".join(step.args) for step in xfrm.STEPS]

    assert any("rfc4106(gcm(aes))" in c and "192.0.2.1" in c for c in commands)
    assert any("cbc(aes)" in c and "hmac(sha256)" in c for c in commands)
    assert any("2001:db8::1" in c and "esp" in c for c in commands)
    assert any("encap espinudp 4500 4500" in c for c in commands)
    assert any(c.startswith("xfrm policy add") for c in commands)
    assert "-4 rule add from all lookup 220 priority 220" in commands
    assert "-6 rule add from all lookup 220 priority 220" in commands


def test_every_step_is_undone_with_the_matching_delete() -> None:
    for step in xfrm.STEPS:
        assert step.cleanup, step.label
        assert "add" in step.args and "delete" in step.cleanup
        assert step.args.index("add") == step.cleanup.index("delete")


@pytest.mark.parametrize(
    ("label", "stderr", "words"),
    [
        ("ESP state with AES-GCM", "RTNETLINK answers: Protocol not supported", "esp4 missing"),
        ("IPv6 ESP state (AES-GCM)", "RTNETLINK answers: Protocol not supported", "esp6 missing"),
        ("ESP state with AES-GCM", "RTNETLINK answers: Function not implemented", "algorithm"),
        ("ESP state with AES-CBC", "RTNETLINK answers: No such file or directory", "algorithm"),
        ("ESP state", "Cannot open netlink socket: Protocol not supported", "xfrm_user"),
        ("IPv4 policy-routing rule (table 220)", "RTNETLINK answers: Operation not supported",
         "IP_MULTIPLE_TABLES"),
        ("IPv6 policy-routing rule (table 220)", "RTNETLINK answers: Address family not "
         "supported by protocol", "IPv6 is disabled"),
        ("UDP-encapsulated ESP state (espinudp, port 4500)", "RTNETLINK answers: Invalid argument",
         "NAT traversal"),
    ],
)  # fmt: skip
def test_kernel_answers_in_plain_words(label: str, stderr: str, words: str) -> None:
    assert words in xfrm.explain(label, stderr)


def test_count_entries() -> None:
    listing = (IKE / "good" / "xfrm-state.initiator").read_text()
    assert xfrm.count_entries(listing) == 2
    assert xfrm.count_entries("") == 0


# --- ikev2_tunnel ----------------------------------------------------------------------


def test_esp_counters_from_a_real_tunnel() -> None:
    counters = ike.esp_counters((IKE / "good" / "xfrm-state.initiator").read_text())

    assert counters == {("192.0.2.1", "192.0.2.2"): (168, 2), ("192.0.2.2", "192.0.2.1"): (168, 2)}


@pytest.mark.parametrize(
    ("case", "role", "state"),
    [
        ("good", "initiator", (True, True)),
        ("good", "responder", (True, True)),
        ("esp4-blocked", "initiator", (True, False)),
        ("esp4-blocked", "responder", (True, False)),
    ],
)
def test_child_state_from_statusall(case: str, role: str, state: tuple[bool, bool]) -> None:
    assert ike.child_state((IKE / case / f"statusall.{role}").read_text()) == state


def test_no_diagnosis_for_a_good_tunnel() -> None:
    for role in ("initiator", "responder"):
        assert ike.diagnose((IKE / "good" / f"charon.{role}.log").read_text()) == []


def test_diagnosis_of_a_kernel_that_refuses_esp() -> None:
    responder = ike.diagnose((IKE / "esp4-blocked" / "charon.responder.log").read_text())
    initiator = ike.diagnose((IKE / "esp4-blocked" / "charon.initiator.log").read_text())

    first = responder[0][1]
    assert first.startswith("the kernel refused the ESP SA (esp4/esp6")
    assert "[charon: unable to add SAD entry with SPI" in first
    assert "netlink error: Protocol not supported (93)" in responder[1][1]
    # The initiator only sees the refusal; ranked after the responder's cause.
    assert initiator[0][1].startswith("the peer refused the CHILD SA (NO_PROPOSAL_CHOSEN)")
    assert initiator[0][0] > responder[0][0]


def test_charon_failure_signatures() -> None:
    log = "\n".join(
        [
            "10:00:00 00[KNL] unable to create netlink socket: Protocol not supported (93)",
            "10:00:01 05[KNL] unable to create IPv4 routing table rule",
        ]
    )
    words = [text for _, text in ike.diagnose(log)]
    assert words[0].startswith("no XFRM netlink interface (xfrm_user missing)")
    assert words[1].startswith("no policy routing (IP_MULTIPLE_TABLES)")


def _ends():
    a = ike.End("initiator", "ns-i", "vi", "192.0.2.1", "10.201.1.1", "10.201.1.0/24")
    b = ike.End("responder", "ns-r", "vr", "192.0.2.2", "10.201.2.1", "10.201.2.0/24")
    return a, b


def test_ipsec_conf_is_ikev2_psk_tunnel_started_by_the_initiator() -> None:
    a, b = _ends()
    initiator, responder = ike.ipsec_conf(a, b), ike.ipsec_conf(b, a)

    for conf in (initiator, responder):
        assert "keyexchange=ikev2" in conf and "type=tunnel" in conf
        assert "leftauth=psk" in conf and "rightauth=psk" in conf
    assert "auto=start" in initiator and "auto=add" in responder
    assert "leftsubnet=10.201.1.0/24" in initiator and "rightsubnet=10.201.1.0/24" in responder
    assert ike.ipsec_secrets(a, b, "k") == (
        '@initiator.imagefactory.test @responder.imagefactory.test : PSK "k"\n'
    )


def test_each_end_gets_private_run_config_and_log() -> None:
    a, _ = _ends()
    script = ike._launch_script(a, Path("/w/i.conf"), Path("/w/i.secrets"), Path("/w/i.log.conf"))

    assert script.startswith("set -e\nmount -t tmpfs -o mode=0755 imagefactory-run /run\n")
    assert "mount --bind '/w/i.conf' /etc/ipsec.conf" in script
    assert "mount --bind '/w/i.secrets' /etc/ipsec.secrets" in script
    assert "/etc/strongswan.d/charon-logging.conf" in script
    assert script.endswith("exec ipsec start --nofork")
    assert ike.CHARON_LOG.startswith("/run/charon.")  # what charon's AppArmor profile allows


def test_the_responder_counts_as_ready_once_its_connection_is_listed() -> None:
    listed = (IKE / "good" / "statusall.responder").read_text()
    assert ike.connection_loaded(listed)
    before = listed.split("Connections:")[0] + "Connections:\nSecurity Associations (0 up):\n"
    assert not ike.connection_loaded(before)
