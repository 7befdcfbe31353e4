#!/bin/bash
# Install strongSwan and apply the service fix for this release.
set -euo pipefail
echo "==> ubuntu-20.04: installing strongswan libstrongswan-standard-plugins libcharon-extra-plugins iptables kmod netcat-openbsd"
apt-get -o DPkg::Lock::Timeout=300 -y -q install --no-install-recommends strongswan libstrongswan-standard-plugins libcharon-extra-plugins iptables kmod netcat-openbsd

# Loaded at every boot: the strongswan-starter unit needs them before charon starts
# (for af_key: /proc/net/pfkey, Algo #14820), and autoloading does not cover them.
cat > /etc/modules-load.d/imagefactory-strongswan.conf <<'MODULES'
af_key
MODULES
for module in af_key; do
  modprobe "$module"
done

# The ipsec.conf daemon's unit is strongswan-starter on 20.04.
systemctl enable strongswan-starter.service
systemctl restart strongswan-starter.service
systemctl is-active --quiet strongswan-starter.service
