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
echo "==> ubuntu-20.04: cloud-init in one process (cloud-init-main.service)"
cloud-init --help | grep -q -- --all-stages || {
  echo "cloud-init $(cloud-init --version 2>&1) has no single-process mode (--all-stages)" >&2
  exit 1
}
if [ -e /usr/lib/systemd/system/cloud-init-main.service ] || [ -e /lib/systemd/system/cloud-init-main.service ]; then
  # The package runs the stages in one process itself (as 26.04's does): keep it that way.
  echo "cloud-init's package ships cloud-init-main.service: its own units stay"
  systemctl enable cloud-init-main.service
else
command -v nc.openbsd >/dev/null || { echo "nc.openbsd is missing (netcat-openbsd)" >&2; exit 1; }
socket_py=/usr/lib/python3/dist-packages/cloudinit/socket.py
# How the stage units talk to the main process: datagrams with a return socket (24.4), or one
# stream connection per stage (25.1 on). Anything else is a protocol this script does not know.
if grep -q 'SOCK_STREAM' "$socket_py"; then
  protocol=stream
elif grep -q 'SOCK_DGRAM' "$socket_py"; then
  protocol=datagram
else
  echo "$socket_py: neither the datagram nor the stream stage protocol" >&2
  exit 1
fi
helper=/usr/local/lib/imagefactory/cloud-init-stage
install -d -m 755 /usr/local/lib/imagefactory
echo "$protocol" > /usr/local/lib/imagefactory/cloud-init-protocol
cat > "$helper" <<'SH'
#!/bin/sh
# imagefactory: hand one cloud-init boot stage to the single cloud-init process
# (cloud-init-main.service) and wait until it is done, in the protocol of the installed
# cloud-init (cloud-init-protocol: datagram for 24.4, stream from 25.1), as upstream's own
# stage units speak it.
#   cloud-init-stage STAGE COMMAND...   (COMMAND runs instead when the main process is not up)
#   cloud-init-stage --verify           (apt hook: back to the package's units if the
#                                        protocol's code changed with an upgrade)
set -eu
root=${IMAGEFACTORY_ROOT:-}  # tests run this against a directory standing in for /
dir=$root/usr/local/lib/imagefactory
share=$root/run/cloud-init/share
units=$root/etc/systemd/system
if [ "${1:-}" = --verify ]; then
  socket_py=$root/usr/lib/python3/dist-packages/cloudinit/socket.py
  now=$(sha256sum < "$socket_py" 2>/dev/null | cut -d' ' -f1) || now=""
  [ -n "$now" ] && [ "$now" = "$(cat "$dir/cloud-init-socket.sha256")" ] && exit 0
  echo "imagefactory: cloud-init's stage protocol changed; using the package's own units" >&2
  rm -f "$units/cloud-init.target.wants/cloud-init-main.service" \
    "$units/cloud-init-main.service" \
    "$units"/cloud-*.service.d/50-imagefactory-single-process.conf \
    "$root/etc/apt/apt.conf.d/80imagefactory-cloud-init"
  [ -n "$root" ] || systemctl daemon-reload 2>/dev/null || true
  exit 0
fi
stage=$1
shift
if ! systemctl is-active --quiet cloud-init-main.service; then
  echo "cloud-init-main.service is not running: running this stage on its own" >&2
  exec "$@"
fi
if [ "$(cat "$dir/cloud-init-protocol")" = stream ]; then
  # Exactly the five bytes cloud-init reads: a byte left unread makes its close a reset, and
  # 22.04's and 24.04's nc then drop the answer that came before it.
  reply=$(printf start | nc.openbsd -U "$share/$stage.sock")
else
  reply=$(echo start | nc.openbsd -Uu -W1 "$share/$stage.sock" -s "$share/$stage-return.sock")
fi
[ -n "$reply" ] || { echo "cloud-init did not answer for its $stage stage" >&2; exit 1; }
# cloud-init's reply is fixed text of its own: "echo '<message>'; exit <status>;"
exec sh -c "$reply"
SH
chmod 755 "$helper"
sha256sum < "$socket_py" | cut -d' ' -f1 > /usr/local/lib/imagefactory/cloud-init-socket.sha256
cat > /etc/systemd/system/cloud-init-main.service <<'UNIT'
# imagefactory: cloud-init's single-process mode (upstream's unit for Ubuntu, cloud-init 24.4).
[Unit]
Description=Cloud-init: Single Process
DefaultDependencies=no
After=systemd-remount-fs.service
Before=cloud-init-local.service
Before=shutdown.target
Conflicts=shutdown.target
RequiresMountsFor=/var/lib/cloud
ConditionPathExists=!/etc/cloud/cloud-init.disabled
ConditionKernelCommandLine=!cloud-init=disabled

[Service]
Type=notify
ExecStart=/usr/bin/cloud-init --all-stages
KillMode=process
TasksMax=infinity
TimeoutStartSec=infinity
StandardOutput=journal+console

[Install]
WantedBy=cloud-init.target
UNIT
# The package's unit for each stage (20.04 to 24.04), the stage's name in the protocol, and
# its own command.
while read -r unit stage command; do
  install -d "/etc/systemd/system/$unit.d"
  printf '[Service]\nExecStart=\nExecStart=%s %s %s\n' "$helper" "$stage" "$command" \
    > "/etc/systemd/system/$unit.d/50-imagefactory-single-process.conf"
done <<'STAGES'
cloud-init-local.service local /usr/bin/cloud-init init --local
cloud-init.service network /usr/bin/cloud-init init
cloud-config.service config /usr/bin/cloud-init modules --mode=config
cloud-final.service final /usr/bin/cloud-init modules --mode=final
STAGES
echo "DPkg::Post-Invoke { \"$helper --verify || true\"; };" \
  > /etc/apt/apt.conf.d/80imagefactory-cloud-init
systemctl daemon-reload
systemctl enable cloud-init-main.service
fi
