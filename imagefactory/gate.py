"""The gate: an artifact is published only on a passing certification of this exact digest
by the current checks. It reads the record (and re-hashes a local artifact), nothing else."""

from __future__ import annotations

from pathlib import Path

from .certify import checks_version
from .digests import sha256_file
from .errors import FactoryError
from .records import Record


class GateRefused(FactoryError):
    """Publishing was refused: the record does not prove this artifact passed."""

    exit_code = 7


def refusal(
    record: Record, checks_dir: Path, local_artifact: bool, current_checks: str | None = None
) -> str | None:
    """Why ``record`` must not be published, or None when it may be."""
    cert = record.certification
    if record.state == "rejected":
        failed = [r.name for r in cert.results if r.status == "fail" and r.required] if cert else []
        return f"it was rejected by certification (failed: {', '.join(failed) or 'unknown'})"
    if cert is None or record.state == "built":
        return f"it is not certified (state {record.state}); run `inv check` first"
    if not cert.passed:
        return "its certification did not pass"
    if cert.artifact_sha256 != record.sha256:
        return (
            f"its certification is for sha256 {cert.artifact_sha256[:16]}…, "
            f"the record's artifact is {record.sha256[:16]}…"
        )
    if local_artifact:
        if not Path(record.artifact).is_file():
            return f"the artifact {record.artifact} is missing"
        actual = sha256_file(Path(record.artifact))
        if actual != record.sha256:
            return (
                f"the artifact changed after certification (sha256 now {actual[:16]}…, "
                f"certified {record.sha256[:16]}…)"
            )
    current = current_checks or checks_version(checks_dir)
    if cert.checks_version != current:
        return (
            f"it was certified by checks version {cert.checks_version[:12]}…, checks/ is now "
            f"{current[:12]}…; re-run `inv check`"
        )
    return None


def require_publishable(
    record: Record, record_path: Path, checks_dir: Path, local_artifact: bool
) -> None:
    reason = refusal(record, checks_dir, local_artifact)
    if reason:
        raise GateRefused(f"not publishing {record_path}: {reason}")
