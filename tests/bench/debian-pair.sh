#!/bin/sh
# Two ext4 root filesystem images of real Debian bookworm arm64 packages, for
# `flightnode-bench chunks --old OUT/v1.img --new OUT/v2.img`: version 2 is what a drone gets
# after a kernel point update and the security updates of its user space.
#
#   tests/bench/debian-pair.sh OUTDIR [SIZE_MIB]
#
# - v1: bookworm (the point release only), with the older of the two newest
#   linux-image-6.1.0-*-arm64 ABIs on the mirror;
# - v2: bookworm + bookworm-security + bookworm-updates, with the newest ABI: a new kernel with
#   all of Debian's modules and a new initrd, plus whatever openssl, python3.11, expat, ...
#   updates the security archive holds that day.
# Both hold the same package list: systemd, udev, the kernel with all its modules and its
# initrd, openssh, python3, curl, wpasupplicant, iproute2, libubootenv-tool. The initrd holds
# what mounts a root file system on SD/eMMC, USB or NVMe (MODULES=list, zstd): Debian's default,
# MODULES=most, takes over an hour per image under qemu-user. The images are built as an image pipeline
# would: fixed file system UUID and hash seed, timestamps from SOURCE_DATE_EPOCH.
#
# Runs as root with qemu-user binfmt for arm64 (mmdebstrap runs the maintainer scripts, the
# kernel's update-initramfs included, in an arm64 chroot), as the virtual-board test does; needs
# mmdebstrap, arch-test, e2fsprogs and xz-utils. Packages come from the host's apt mirrors, so
# the pair changes as Debian publishes updates; OUTDIR/versions.txt and changed.txt say what it holds.
# About 10 minutes and 3 GB of disk.
set -eu
out=${1:?usage: debian-pair.sh OUTDIR [SIZE_MIB]}
size=${2:-1024}
mkdir -p "$out"
out=$(cd "$out" && pwd)

uri() { apt-get indextargets --format '$(REPO_URI) $(RELEASE)' | awk -v r="$1" '$2 == r {print $1; exit}'; }
main=$(uri bookworm)
security=$(uri bookworm-security)
[ -n "$main" ] && [ -n "$security" ] || {
  echo "debian-pair.sh: the host's apt sources need bookworm and bookworm-security (to take the mirrors from)" >&2
  exit 2
}

# The two newest kernel ABIs in bookworm's own index.
abis=$(curl -sf "${main%/}/dists/bookworm/main/binary-arm64/Packages.xz" | xz -dc |
  sed -n 's/^Package: linux-image-\(6\.1\.0-[0-9]*\)-arm64$/\1/p' | sort -t- -k2,2n -u | tail -2)
old_abi=$(echo "$abis" | head -1)
new_abi=$(echo "$abis" | tail -1)
[ -n "$old_abi" ] && [ "$old_abi" != "$new_abi" ] || {
  echo "debian-pair.sh: bookworm's arm64 index lists fewer than two linux-image-6.1.0-*-arm64 ABIs" >&2
  exit 2
}
echo "kernel: v1 linux-image-$old_abi-arm64, v2 linux-image-$new_abi-arm64" | tee "$out/versions.txt"

build() { # version abi sources...
  v=$1 abi=$2
  shift 2
  mmdebstrap --arch=arm64 --variant=essential --mode=root --format=tar \
    --hook-dir=/usr/share/mmdebstrap/hooks/eatmydata \
    --include=systemd-sysv,udev,kmod,linux-image-"$abi"-arm64,initramfs-tools,libubootenv-tool,openssh-server,python3,curl,ca-certificates,wpasupplicant,iproute2 \
    --essential-hook='
      mkdir -p "$1/etc/initramfs-tools/conf.d"
      printf "MODULES=list\nCOMPRESS=zstd\n" > "$1/etc/initramfs-tools/conf.d/board"
      # A hook, not /etc/initramfs-tools/modules: that is a conffile of initramfs-tools.
      mkdir -p "$1/etc/initramfs-tools/hooks"
      printf "#!/bin/sh\n[ \"\$1\" = prereqs ] && exit 0\n. /usr/share/initramfs-tools/hook-functions\nfor m in ext4 mmc_block sdhci_of_arasan sdhci_iproc dw_mmc_rockchip sdhci_esdhc_imx usb_storage uas nvme virtio_blk virtio_pci; do manual_add_modules \$m; done\n" > "$1/etc/initramfs-tools/hooks/board"
      chmod 755 "$1/etc/initramfs-tools/hooks/board"
    ' \
    --customize-hook='rm -f "$1/etc/machine-id"; touch "$1/etc/machine-id"; rm -rf "$1"/var/lib/apt/lists/*_Packages "$1"/var/cache/apt/archives/*.deb' \
    bookworm "$out/v$v.tar" "$@" > "$out/v$v.log" 2>&1
}

echo "building both root filesystems (logs in $out/v1.log and v2.log)"
build 1 "$old_abi" "deb $main bookworm main" &
p1=$!
build 2 "$new_abi" "deb $main bookworm main" "deb $main bookworm-updates main" "deb $security bookworm-security main" &
p2=$!
wait $p1 || { echo "debian-pair.sh: v1 failed, see $out/v1.log" >&2; exit 1; }
wait $p2 || { echo "debian-pair.sh: v2 failed, see $out/v2.log" >&2; exit 1; }

epoch=${SOURCE_DATE_EPOCH:-1780000000}
for v in 1 2; do
  rm -rf "$out/tree$v" && mkdir "$out/tree$v"
  tar -C "$out/tree$v" -xpf "$out/v$v.tar"
  chroot "$out/tree$v" dpkg-query -W -f '${Package} ${Version}\n' > "$out/v$v.packages" 2>/dev/null || true
  E2FSPROGS_FAKE_TIME=$epoch mkfs.ext4 -q -F -b 4096 -U 6b1e2d3c-0f5a-4c8e-9d7b-1a2b3c4d5e6f \
    -E hash_seed=1f2e3d4c-5b6a-4798-8a9b-0c1d2e3f4a5b,root_owner=0:0 \
    -d "$out/tree$v" "$out/v$v.img" "${size}M"
  rm -rf "$out/tree$v" "$out/v$v.tar"
done
echo "packages that differ (v1 -> v2):"
diff "$out/v1.packages" "$out/v2.packages" | sed -n 's/^> /  /p' | tee "$out/changed.txt"
du -sh --apparent-size "$out"/v1.img "$out"/v2.img
