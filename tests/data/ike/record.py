"""Record what checks/ikev2_tunnel.py parses, from a real tunnel in a focal guest (as root):

    python3 record.py --checks /path/to/checks --out DIR

Brings the two ends up exactly as the check does, waits, and saves `ipsec statusall` of both
ends, `ip -s xfrm state` of the initiator after a ping, and both charon logs; then cleans up.
Run it once on a good image and once with `install esp4 /bin/false` in modprobe.d (esp4
unloaded) to record the failure signatures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checks", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--wait", type=float, default=20)
    args = parser.parse_args()
    sys.path.insert(0, args.checks)
    import ikev2_tunnel as ike
    from checklib import Cleanup, run

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    a = ike.End("initiator", "rec-ike-i", "reci", "192.0.2.1", "10.201.1.1", "10.201.1.0/24")
    b = ike.End("responder", "rec-ike-r", "recr", "192.0.2.2", "10.201.2.1", "10.201.2.0/24")
    with tempfile.TemporaryDirectory() as tmp, Cleanup() as cleanup:
        assert ike._setup_network(a, b, cleanup) is None
        ike._start(b, a, Path(tmp), "recorded-psk", cleanup)
        ike._start(a, b, Path(tmp), "recorded-psk", cleanup)
        time.sleep(args.wait)
        run(["ip", "netns", "exec", a.ns, "ping", "-c", "2", "-I", a.inner, b.inner])
        for end in (a, b):
            status = ike._inside(end, "ipsec", "statusall").stdout
            (out / f"statusall.{end.role}").write_text(status)
            (out / f"charon.{end.role}.log").write_text(
                ike._inside(end, "cat", ike.CHARON_LOG).stdout
            )
        (out / "xfrm-state.initiator").write_text(
            run(["ip", "-n", a.ns, "-s", "xfrm", "state"]).stdout
        )
    print(f"recorded into {out}")


if __name__ == "__main__":
    main()
