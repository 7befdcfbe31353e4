"""hygiene: nothing of the build, and no credential but this boot's, is in the instance.

An image is shared with everyone who boots it: no extra users, no authorized key other than
the ones injected at this boot, no usable password, host keys and machine-id created at this
boot (not baked into the image, where every instance would share them), no build leftovers.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

from checklib import Context, Result, boot_time, failed, passed, read_text, run

UID_MIN, UID_MAX = 1000, 65533  # nobody (65534) and 65535 are not people
# Clocks step after boot (NTP): a file made at this boot may look slightly older than btime.
# Anything baked into the image is hours or days older.
FIRST_BOOT = "baked into the image, or this is not the instance's first boot"
SKEW_S = 120
DEFAULT_AUTHORIZED_KEYS = (".ssh/authorized_keys", ".ssh/authorized_keys2")
KEY_RE = re.compile(r"(?:^|\s)((?:ssh-|ecdsa-sha2-|sk-)[\w@.-]+)\s+([A-Za-z0-9+/]+={0,3})(?:\s|$)")


@dataclass
class Account:
    name: str
    uid: int
    home: str


def parse_passwd(text: str) -> list[Account]:
    accounts = []
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 7 and fields[2].isdigit():
            accounts.append(Account(fields[0], int(fields[2]), fields[5]))
    return accounts


def default_user(cloud_cfgs: list[str]) -> str | None:
    """system_info.default_user.name from cloud.cfg and cloud.cfg.d (later files win).
    A small reader for that one key: the guest has no YAML library."""
    name = None
    for text in cloud_cfgs:
        block_indent = None
        for line in text.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            indent = len(line) - len(line.lstrip())
            inline = re.match(r"\s*default_user:\s*\{(.*)\}", line)
            if inline:
                found = re.search(r"\bname:\s*['\"]?([\w.-]+)", inline.group(1))
                name = found.group(1) if found else name
                continue
            if re.match(r"\s*default_user:\s*$", line):
                block_indent = indent
                continue
            if block_indent is not None:
                if indent <= block_indent:
                    block_indent = None
                    continue
                found = re.match(r"\s*name:\s*['\"]?([\w.-]+)", line)
                if found:
                    name = found.group(1)
    return name


def key_identity(line: str) -> tuple[str, str] | None:
    """(type, base64 blob) of an authorized_keys or public-key line; options and the
    comment do not matter (cloud-init prefixes root's keys with a command= option)."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    match = KEY_RE.search(line)
    return (match.group(1), match.group(2)) if match else None


def stray_keys(path: str, text: str, allowed: set[tuple[str, str]]) -> list[str]:
    strays = []
    for number, line in enumerate(text.splitlines(), 1):
        identity = key_identity(line)
        if identity is None and line.strip() and not line.strip().startswith("#"):
            strays.append(f"{path}:{number} (unparsable key line)")
        elif identity is not None and identity not in allowed:
            comment = line.split(identity[1], 1)[1].strip()
            strays.append(f"{path}:{number} {identity[0]} {comment}".rstrip())
    return strays


def usable_passwords(shadow: str) -> list[str]:
    """Accounts that can log in with a password: an empty field or a hash that is not locked
    ('!' or '*' first)."""
    usable = []
    for line in shadow.splitlines():
        fields = line.split(":")
        if len(fields) < 2:
            continue
        hashed = fields[1]
        if hashed == "":
            usable.append(f"{fields[0]} (empty password)")
        elif not hashed.startswith(("!", "*")):
            usable.append(fields[0])
    return usable


def sudoers_users(text: str) -> set[str]:
    """User names that rules in a sudoers file grant to (not Defaults, aliases or %groups)."""
    users = set()
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith(("#", "@", "%", "Defaults")):
            continue
        if words[0].endswith("_Alias") or words[0].isupper():  # alias definitions and uses
            continue
        users.update(name.strip() for name in words[0].split(",") if name.strip())
    return users


def made_before_boot(paths: list[str], btime: float) -> list[str]:
    return [p for p in paths if os.stat(p).st_mtime < btime - SKEW_S]


def sshd_key_settings(sshd_t: str) -> tuple[list[str], str | None]:
    """From `sshd -T`: the AuthorizedKeysFile patterns (sshd's default when absent) and the
    AuthorizedKeysCommand, if one is set."""
    settings = {}
    for line in sshd_t.splitlines():
        key, _, value = line.partition(" ")
        settings[key.lower()] = value.strip()
    patterns = settings.get("authorizedkeysfile", "").split() or list(DEFAULT_AUTHORIZED_KEYS)
    command = settings.get("authorizedkeyscommand")
    return patterns, None if command in (None, "", "none") else command


def expand(pattern: str, account: Account) -> str:
    path = pattern.replace("%%", "\0").replace("%h", account.home).replace("%u", account.name)
    path = path.replace("\0", "%")
    return path if path.startswith("/") else os.path.join(account.home, path)


# ---------------------------------------------------------------------------------------


def check_users(accounts: list[Account], default: str | None) -> list[str]:
    people = [a.name for a in accounts if UID_MIN <= a.uid <= UID_MAX and a.name != default]
    return [f"unexpected user(s) {', '.join(people)}"] if people else []


def check_keys(accounts: list[Account], allowed: set[tuple[str, str]]) -> tuple[list[str], int]:
    patterns, command = sshd_key_settings(run(["sshd", "-T"], timeout=30).stdout)
    problems = []
    if command:
        problems.append(f"sshd asks AuthorizedKeysCommand {command!r} for keys (not auditable)")
    seen, strays, count = set(), [], 0
    for account in accounts:
        for pattern in patterns:
            path = expand(pattern, account)
            if path in seen or not os.path.isfile(path):
                continue
            seen.add(path)
            text = read_text(path, "") or ""
            count += sum(1 for line in text.splitlines() if key_identity(line))
            strays += stray_keys(path, text, allowed)
    if strays:
        problems.append(f"authorized keys not injected at this boot: {'; '.join(strays)}")
    return problems, count


def check_boot_made(btime: float | None) -> list[str]:
    problems = []
    host_keys = sorted(glob.glob("/etc/ssh/ssh_host_*_key"))
    machine_id = (read_text("/etc/machine-id", "") or "").strip()
    if not host_keys:
        problems.append("no SSH host keys in /etc/ssh")
    if not re.fullmatch(r"[0-9a-f]{32}", machine_id):
        problems.append(f"/etc/machine-id is not initialised ({machine_id or 'empty'!r})")
    if btime is None:
        return [*problems, "no btime in /proc/stat: cannot tell what was made at this boot"]
    old = made_before_boot(host_keys, btime)
    if old:
        problems.append(f"SSH host keys older than this boot ({FIRST_BOOT}): {', '.join(old)}")
    if machine_id and made_before_boot(["/etc/machine-id"], btime):
        problems.append(f"/etc/machine-id is older than this boot ({FIRST_BOOT})")
    return problems


def check_leftovers(default: str | None) -> list[str]:
    left = glob.glob("/var/tmp/imagefactory-report*") + glob.glob("/tmp/script_*.sh")
    history = Path("/root/.bash_history")
    if history.is_file() and history.stat().st_size > 0:
        left.append(str(history))
    sudoers = Path("/etc/sudoers.d/90-cloud-init-users")
    extra = sorted(sudoers_users(read_text(sudoers, "") or "") - {default, "root"})
    if extra:
        left.append(f"{sudoers} grants {', '.join(extra)}")
    return [f"build leftovers: {', '.join(left)}"] if left else []


def check(ctx: Context) -> Result:
    accounts = parse_passwd(read_text("/etc/passwd", "") or "")
    cfgs = ["/etc/cloud/cloud.cfg", *sorted(glob.glob("/etc/cloud/cloud.cfg.d/*.cfg"))]
    default = default_user([read_text(p, "") or "" for p in cfgs])
    allowed = {k for k in map(key_identity, ctx.section("allowed_authorized_keys") or []) if k}
    problems = check_users(accounts, default)
    key_problems, key_count = check_keys(accounts, allowed)
    problems += key_problems
    passwords = usable_passwords(read_text("/etc/shadow", "") or "")
    if passwords:
        problems.append(f"usable password for {', '.join(passwords)}")
    problems += check_boot_made(boot_time())
    problems += check_leftovers(default)
    data = {"default_user": default, "authorized_keys": key_count, "allowed_keys": len(allowed)}
    if problems:
        return failed("; ".join(problems), **data)
    return passed(
        f"only {default or 'no default user'}; {key_count} authorized key(s), all "
        f"injected at this boot; no passwords; host keys and machine-id from this "
        f"boot; no build leftovers",
        **data,
    )
