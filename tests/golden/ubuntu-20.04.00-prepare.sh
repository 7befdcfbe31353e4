#!/bin/bash
# Wait until the instance is settled and keep apt's timers out of the way for the build.
set -euo pipefail
echo "==> ubuntu-20.04: waiting for cloud-init"
cloud-init status --wait >/dev/null || true

# apt-daily and unattended-upgrades grab the dpkg lock at random; they are unmasked
# again by 90-cleanup.sh so the published image still installs security updates.
systemctl mask --now apt-daily.timer apt-daily-upgrade.timer apt-daily.service \
  apt-daily-upgrade.service unattended-upgrades.service >/dev/null 2>&1 || true

deadline=$((SECONDS + 600))
while fuser /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock >/dev/null 2>&1; do
  if ((SECONDS > deadline)); then
    echo "dpkg lock still held after 600 s" >&2
    exit 1
  fi
  sleep 3
done
