#!/bin/bash
# Leave nothing of the build behind: no user, keys, passwords, host keys, machine
# identity, cloud-init state, logs or package caches. A published image carries
# none of the build's credentials.
set -euo pipefail
echo "==> ubuntu-20.04: cleaning up for capture"
systemctl unmask apt-daily.timer apt-daily-upgrade.timer apt-daily.service \
  apt-daily-upgrade.service unattended-upgrades.service >/dev/null 2>&1 || true

apt-get -y -q autoremove --purge
apt-get -y -q clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin

# Every authorized key and every password: the provider injects a fresh key at boot.
rm -f /root/.ssh/authorized_keys /home/*/.ssh/authorized_keys
passwd -l root >/dev/null
rm -f /etc/sudoers.d/90-cloud-init-users

# Host keys are regenerated at first boot (cloud-init's ssh module does it).
rm -f /etc/ssh/ssh_host_*

# An empty machine-id makes systemd initialise a new one at first boot.
truncate -s 0 /etc/machine-id
rm -f /var/lib/dbus/machine-id
ln -s /etc/machine-id /var/lib/dbus/machine-id

cloud-init clean --logs --seed
rm -rf /var/lib/cloud/instances /var/lib/cloud/instance

# The journal of this build (its logins included) must not ship: log to memory until the
# shutdown, through a drop-in in /run that vanishes with it, and drop what was stored.
mkdir -p /run/systemd/journald.conf.d
printf '[Journal]\nStorage=volatile\n' > /run/systemd/journald.conf.d/imagefactory-capture.conf
systemctl restart systemd-journald
# rsyslog would go on writing this build's logins and shutdown into /var/log (auth.log,
# syslog) after they are emptied: stopped for the rest of this boot (it starts again at the next).
systemctl stop rsyslog.service syslog.socket >/dev/null 2>&1 || true
rm -rf /var/log/journal/*/
find /var/log -type f -exec truncate -s 0 {} +
rm -rf /tmp/* /var/tmp/* /root/.bash_history /home/*/.bash_history

# The build user goes last: it is the account Packer is still connected as.
if [ -n "${BUILD_USER:-}" ] && [ "$BUILD_USER" != root ] && id "$BUILD_USER" >/dev/null 2>&1; then
  userdel --force --remove "$BUILD_USER" 2>/dev/null || userdel --force "$BUILD_USER"
fi

# Freed blocks must not be captured: trimmed where the disk passes discards through (qemu,
# most clouds), otherwise zeroed, which compresses to nothing.
if ! fstrim / >/dev/null 2>&1; then  # explicit: -a skips disks without discard
  dd if=/dev/zero of=/var/tmp/zero bs=1M status=none 2>/dev/null || true
  rm -f /var/tmp/zero
fi
sync
