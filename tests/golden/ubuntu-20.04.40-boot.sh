#!/bin/bash
# Leave out at boot what a VPN server never uses (image definition: boot).
set -euo pipefail
echo "==> ubuntu-20.04: skipping cloud-init modules wireguard snap ubuntu_autoinstall keyboard ubuntu_pro byobu fan landscape lxd ubuntu_drivers puppet chef ansible mcollective salt_minion reset_rmc phone_home"
# The module lists come from this release's own cloud.cfg, minus the skipped ones.
python3 - <<'PY'
import yaml

skip = set("wireguard snap ubuntu_autoinstall keyboard ubuntu_pro byobu fan landscape lxd ubuntu_drivers puppet chef ansible mcollective salt_minion reset_rmc phone_home".split())
with open("/etc/cloud/cloud.cfg") as fh:
    cfg = yaml.safe_load(fh)
keep = {
    key: [m for m in cfg[key] if (m if isinstance(m, str) else m[0]) not in skip]
    for key in ("cloud_init_modules", "cloud_config_modules", "cloud_final_modules")
    if key in cfg
}
with open("/etc/cloud/cloud.cfg.d/90_imagefactory_boot.cfg", "w") as fh:
    fh.write("# Written by imagefactory: modules a VPN server does not use are skipped.\n")
    yaml.safe_dump(keep, fh)
PY
systemctl mask e2scrub_reap.service ondemand.service grub-initrd-fallback.service
