#!/bin/bash
# What the build record needs from inside the image: the package manifest (like Ubuntu's
# .manifest), the kernel the image boots, the release. Packer downloads the tarball.
set -euo pipefail
report=/var/tmp/imagefactory-report
rm -rf "$report" && mkdir -p "$report"
dpkg-query -W > "$report/packages.manifest"
# shellcheck disable=SC1091
. /etc/os-release
{
  echo "kernel=$(find /lib/modules -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n1)"
  echo "version_id=$VERSION_ID"
  echo "codename=$VERSION_CODENAME"
} > "$report/facts"
# What Ubuntu's own image of this release carries: its seeds, as the archive's metapackages
# list them (Depends, Recommends), read while this build's package lists are still here.
apt-cache show --no-all-versions ubuntu-minimal ubuntu-standard ubuntu-server > "$report/reference.control"
tar -C "$report" -cf /var/tmp/imagefactory-report.tar .
