"""qemu.stop_reason: a guest that will never come up is named at once, not after 15 minutes."""

from pathlib import Path

from imagefactory import qemu

# 26.04's kernel 7.0 under TCG, recorded in CI: it panicked 4.7 s in, then hung.
PANIC = (Path(__file__).parent / "data/resolute/console-tcg-int3-panic.txt").read_text()


def test_a_kernel_panic_on_the_console_stops_the_wait_with_its_reason():
    assert qemu.stop_reason(None, PANIC) == ("the kernel panicked (Fatal exception in interrupt)")


def test_a_console_still_booting_is_no_reason_to_stop():
    before_the_oops = PANIC[: PANIC.index("Oops")]
    assert "ata1.00: ATAPI" in before_the_oops
    assert qemu.stop_reason(None, before_the_oops) is None


def test_qemu_gone_is_a_reason_whatever_the_console_says():
    assert qemu.stop_reason(1, "") == "QEMU exited (status 1)"
    assert qemu.stop_reason(0, PANIC) == "QEMU exited (status 0)"
