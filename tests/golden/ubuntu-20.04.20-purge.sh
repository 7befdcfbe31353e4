#!/bin/bash
# Purge what a VPN server must not carry, and pin it away so no dependency returns it.
set -euo pipefail
echo "==> ubuntu-20.04: purging snapd"
# Stop snapd and unmount its squashfs mounts before purging (they hold /snap busy).
systemctl stop snapd.service snapd.socket snapd.seeded.service >/dev/null 2>&1 || true
for mount in $(awk '$2 ~ "^/snap/" {print $2}' /proc/mounts | sort -r); do
  umount -l "$mount" || true
done
installed=()
for pkg in snapd; do
  if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed'; then
    installed+=("$pkg")
  fi
done
if ((${#installed[@]})); then
  apt-get -o DPkg::Lock::Timeout=300 -y -q purge --auto-remove "${installed[@]}"
fi
rm -rf /snap /var/snap /var/lib/snapd /var/cache/snapd /root/snap /home/*/snap

cat > /etc/apt/preferences.d/imagefactory-pin-away <<'PIN'
# Written by imagefactory: these packages must never be installed on this image.
Package: snapd
Pin: release *
Pin-Priority: -1
PIN
