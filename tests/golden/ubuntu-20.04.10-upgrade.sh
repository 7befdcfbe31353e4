#!/bin/bash
# Bring every package to the archive's current version (security pockets included).
set -euo pipefail
echo "==> ubuntu-20.04: full upgrade"
apt_retry() {
  local attempt
  for attempt in 1 2 3; do
    apt-get -o DPkg::Lock::Timeout=300 "$@" && return 0
    echo "apt-get $* failed (attempt $attempt), retrying" >&2
    sleep $((attempt * 10))
  done
  return 1
}
# No translated descriptions: nothing here reads them (some MB less to fetch under TCG).
apt_retry -o Acquire::Languages=none update -q
apt_retry -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold full-upgrade
