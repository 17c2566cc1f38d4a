#!/bin/sh
# Adds the md5sums control file cargo-deb does not write (dpkg --verify and debsums read it):
# unpacks the package, sums every file shipped, packs it again in place.
# Usage: agent/debian/add-md5sums.sh PACKAGE.deb
set -eu
deb=$1
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
dpkg-deb -R "$deb" "$tree/pkg"
(cd "$tree/pkg" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum > DEBIAN/md5sums)
chmod 0644 "$tree/pkg/DEBIAN/md5sums"
dpkg-deb --root-owner-group -Zxz -b "$tree/pkg" "$deb" >/dev/null
