#!/bin/sh
# The virtual board's base root filesystem, from Debian packages only: bookworm arm64 (the
# Essential set + systemd + Debian's arm64 kernel + libubootenv-tool), as a tarball. The test
# caches the tarball under target/vboard/ keyed by this file's contents, so edit this file to
# rebuild it.
#
#   mkrootfs.sh OUT.tar
#
# Runs as root with qemu-user binfmt for arm64 (mmdebstrap runs the packages' maintainer scripts
# in an arm64 chroot). Packages come from the host's apt sources (mmdebstrap's default).
# What the agent needs on top (its .deb, configuration, keys) is added per board by the test.
#
# Build time is mostly arm64 maintainer scripts under qemu-user and dpkg's fsyncs, so:
# - variant essential, not minbase: no apt (and its libraries) on a board that never runs it;
#   mmdebstrap installs the --include list with the host's apt;
# - no ca-certificates (and so no openssl, no c_rehash): the board fetches bundles over http://
#   from the host, and the agent needs CA roots only for https:// downloads;
# - dpkg runs under eatmydata (mmdebstrap's hook): no fsync per file;
# - what the board never uses is not unpacked at all (path-exclude), so the kernel's postinst
#   (depmod, update-initramfs) and udev's (systemd-hwdb update) work on a few files instead of
#   Debian's 300 MB of modules and the whole hardware database.
set -eu
out=$1

# Only what a virtio board boots with: block, net, rng, ext4. The rest of Debian's 300 MB of
# modules would make every rootfs bundle that much bigger.
keep='/(virtio[^/]*|net_failover|failover|ext4|jbd2|mbcache|crc16|crc32c_generic|libcrc32c|crc32_generic)\.ko'

mmdebstrap --arch=arm64 --variant=essential --mode=root --format=tar \
  --hook-dir=/usr/share/mmdebstrap/hooks/eatmydata \
  --include=systemd-sysv,udev,kmod,init-system-helpers,linux-image-arm64,initramfs-tools,libubootenv-tool \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/lib/udev/hwdb.d/*' \
  --dpkgopt='path-exclude=/usr/lib/udev/hwdb.bin' \
  --dpkgopt='path-exclude=/usr/lib/linux-image-*' \
  --dpkgopt='path-exclude=/lib/modules/*/kernel/*' \
  --dpkgopt='path-include=/lib/modules/*/kernel/*/virtio*' \
  --dpkgopt='path-include=/lib/modules/*/kernel/*/net_failover.ko*' \
  --dpkgopt='path-include=/lib/modules/*/kernel/*/failover.ko*' \
  --dpkgopt='path-include=/lib/modules/*/kernel/fs/ext4/*' \
  --dpkgopt='path-include=/lib/modules/*/kernel/fs/jbd2/*' \
  --dpkgopt='path-include=/lib/modules/*/kernel/fs/mbcache.ko*' \
  --dpkgopt='path-include=/lib/modules/*/kernel/lib/crc16.ko*' \
  --dpkgopt='path-include=/lib/modules/*/kernel/lib/libcrc32c.ko*' \
  --dpkgopt='path-include=/lib/modules/*/kernel/*/crc32c_generic.ko*' \
  --dpkgopt='path-include=/lib/modules/*/kernel/*/crc32_generic.ko*' \
  --essential-hook='
    set -eu
    # The initrd (made when the kernel is installed) holds only what mounts a virtio ext4 root:
    # MODULES=list plus this hook, instead of all of Debian'"'"'s modules.
    mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/etc/initramfs-tools/hooks"
    printf "MODULES=list\nCOMPRESS=gzip\n" > "$1/etc/initramfs-tools/conf.d/vboard"
    printf "#!/bin/sh\n[ \"\$1\" = prereqs ] && exit 0\n. /usr/share/initramfs-tools/hook-functions\nfor m in virtio_pci virtio_blk ext4; do force_load \$m; done\n" > "$1/etc/initramfs-tools/hooks/vboard"
    chmod 755 "$1/etc/initramfs-tools/hooks/vboard"
  ' \
  --customize-hook='
    set -eu
    v=$(ls "$1/lib/modules")
    find "$1/lib/modules/$v/kernel" -name "*.ko*" | grep -Ev "'"$keep"'" | xargs rm -f
    find "$1/lib/modules/$v/kernel" -type d -empty -delete
    chroot "$1" depmod "$v"
    # Device trees (qemu hands U-Boot its own) and udev'"'"'s hardware database (names for real
    # hardware; 13 MB in every rootfs bundle).
    rm -rf "$1/usr/lib/linux-image-$v" "$1/usr/lib/udev/hwdb.d" "$1/usr/lib/udev/hwdb.bin"
    # The boot script loads /boot/vmlinuz and /boot/initrd.img from the slot it boots.
    ln -sf "vmlinuz-$v" "$1/boot/vmlinuz"
    ln -sf "initrd.img-$v" "$1/boot/initrd.img"
    echo vboard > "$1/etc/hostname"
    printf "/dev/vda4 /var/lib/flightnode ext4 defaults,noatime 0 2\n" > "$1/etc/fstab"
    mkdir -p "$1/var/lib/flightnode"
    # qemu user networking: DHCP on the virtio NIC; the host is 10.0.2.2.
    mkdir -p "$1/etc/systemd/network"
    printf "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n" > "$1/etc/systemd/network/20-wired.network"
    chroot "$1" systemctl enable systemd-networkd.service
    # The journal on the serial console: that is where the test reads what the board does.
    mkdir -p "$1/etc/systemd/journald.conf.d"
    printf "[Journal]\nStorage=volatile\nForwardToConsole=yes\nTTYPath=/dev/ttyAMA0\nMaxLevelConsole=info\n" > "$1/etc/systemd/journald.conf.d/console.conf"
    # The A/B variables live in the U-Boot environment block at 512 KiB of the boot disk (the
    # gap before partition 1), where the boot script imports and exports them.
    printf "/dev/vda 0x80000 0x40000 0x40000\n" > "$1/etc/fw_env.config"
    printf "BOOT_ORDER=A B\nBOOT_A_LEFT=3\nBOOT_B_LEFT=3\n" > "$1/etc/u-boot-initial-env"
    rm -f "$1/etc/machine-id" && touch "$1/etc/machine-id"
    rm -rf "$1/var/cache/apt/archives"/*.deb "$1/var/lib/apt/lists"/*_Packages
  ' \
  bookworm "$out"
