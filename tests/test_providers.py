"""providers.booted_overlay: one fresh retry for a TCG kernel panic, kept in the evidence."""

import contextlib

import pytest

from imagefactory import providers, qemu
from imagefactory.context import Instance
from imagefactory.ssh import GuestStoppedError, SSHTarget
from imagefactory.steps import StepLog


def stopped(reason: str) -> GuestStoppedError:
    return GuestStoppedError(f"ubuntu@127.0.0.1:2222: {reason} before SSH came up", reason)


PANIC = stopped("the kernel panicked (y)")
GONE = stopped("QEMU exited (status 1)")


@pytest.fixture
def boots(monkeypatch):
    """Replaces the real boot: each entry is raised, or (for None) a ready instance returned."""
    outcomes: list = []
    closed: list[int] = []

    def fake_boot(stack: contextlib.ExitStack, disk, work, accelerator, log, memory, cpus):
        attempt = len(closed) + 1
        stack.callback(closed.append, attempt)  # the VM is stopped whatever happens
        outcome = outcomes.pop(0)
        if outcome:
            raise outcome
        return Instance(SSHTarget("ubuntu", "127.0.0.1", 2222), ["key"], {"ssh": 1.0})

    monkeypatch.setattr(providers, "_boot", fake_boot)
    return outcomes, closed


def use_accelerator(monkeypatch, name: str) -> None:
    monkeypatch.setattr(qemu, "choose_accelerator", lambda *a: name)


def test_a_panic_under_tcg_gets_one_fresh_boot_and_is_recorded(boots, monkeypatch, tmp_path):
    outcomes, closed = boots
    outcomes += [PANIC, None]
    use_accelerator(monkeypatch, "tcg")
    with providers.booted_overlay(tmp_path / "d.qcow2", tmp_path, tmp_path, StepLog()) as vm:
        assert vm.earlier_boots == ["boot 1: the kernel panicked (y)"]
        assert closed == [1]  # the panicked guest is gone before the next one boots
    assert closed == [1, 2]


def test_a_second_panic_fails(boots, monkeypatch, tmp_path):
    outcomes, closed = boots
    outcomes += [PANIC, PANIC]
    use_accelerator(monkeypatch, "tcg")
    with (
        pytest.raises(GuestStoppedError, match="panicked"),
        providers.booted_overlay(tmp_path / "d.qcow2", tmp_path, tmp_path, StepLog()),
    ):
        pass
    assert closed == [1, 2]


@pytest.mark.parametrize(("accelerator", "failure"), [("kvm", PANIC), ("tcg", GONE)])
def test_no_retry_for_a_panic_under_kvm_or_a_guest_that_stopped(
    boots, monkeypatch, tmp_path, accelerator, failure
):
    outcomes, closed = boots
    outcomes += [failure, None]
    use_accelerator(monkeypatch, accelerator)
    with (
        pytest.raises(GuestStoppedError),
        providers.booted_overlay(tmp_path / "d.qcow2", tmp_path, tmp_path, StepLog()),
    ):
        pass
    assert closed == [1]
