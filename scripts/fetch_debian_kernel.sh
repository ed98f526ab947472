#!/usr/bin/env bash
# Downloads Debian's cloud kernel image package and unpacks it into DIR (for the Linux
# boot test). Usage: scripts/fetch_debian_kernel.sh DIR
set -euo pipefail
dir=${1:?usage: fetch_debian_kernel.sh DIR}
mkdir -p "$dir"
cd "$dir"
# The metapackage names the current image package.
pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
if [ -z "$pkg" ]; then
    apt-get update -qq
    pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
fi
echo "fetching $pkg" >&2
apt-get download "$pkg" >/dev/null
dpkg-deb -x ./"$pkg"_*.deb .
rm -f ./"$pkg"_*.deb
ls boot/vmlinuz-* >&2
