#!/usr/bin/env bash
# Builds real U-Boot with a REDUNDANT environment for the reboot-mode tests
# (tests/src/uboot_qemu.rs, `UbootQemu::new_redundant`): Debian's own u-boot 2023.01 source
# package, `qemu_arm64_defconfig` (the build Debian ships as u-boot-qemu) with the environment moved
# to an SD card and given a second copy, the way eMMC/SD boards keep it.
#
#   tests/uboot/build-redundant.sh OUT_DIR      -> OUT_DIR/u-boot.bin (skipped when it exists)
#
# Why not Debian's binary: it keeps ONE copy in pflash (`# CONFIG_SYS_REDUNDAND_ENVIRONMENT is not
# set`). Why SD and not pflash with a second sector: U-Boot's flash driver marks copies with
# active/obsolete flags, libubootenv on a plain file (the test's flash image) with incrementing
# counters; only on a real NOR MTD device does libubootenv switch to U-Boot's flags. On SD/eMMC
# both sides use the counters, as on the boards this models.
#
# The layout the tests rely on (keep in sync with tests/src/uboot_qemu.rs):
#   SD card (qemu `-device sdhci-pci -device sd-card`), copy 1 at 0x100000, copy 2 at 0x120000,
#   0x20000 bytes each.
# Needs: apt sources for bookworm (the deb-src line is made from them), dpkg-dev, bison, flex,
# bc, libssl-dev, gcc-aarch64-linux-gnu. About 1-2 CPU-minutes.
set -euo pipefail
out="${1:?usage: build-redundant.sh OUT_DIR}"
[[ -f "$out/u-boot.bin" ]] && exit 0
mkdir -p "$out"
out=$(cd "$out" && pwd)
work="$out/work"
rm -rf "$work"
mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial" "$work/src"

# The same mirror the system's bookworm sources use, with a private apt configuration: the
# system's sources and packages stay as they are.
mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' | awk '$2 == "bookworm" {print $1; exit}')
[[ -n "$mirror" ]] || { echo "build-redundant.sh: no bookworm apt source to take the mirror from" >&2; exit 2; }
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bookworm main" \
    >"$work/apt/sources.list"
o=(-o "Dir::Etc::sourcelist=$work/apt/sources.list" -o "Dir::Etc::sourceparts=-"
    -o "Dir::State::lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache" -o "APT::Sandbox::User=root")
apt-get "${o[@]}" update -qq
# The version Debian's u-boot-qemu binary is, when installed: the same source, another config.
version=$(dpkg-query -W -f='${Version}' u-boot-qemu 2>/dev/null || true)
(cd "$work/src" && apt-get "${o[@]}" source --download-only -qq "u-boot${version:+=$version}")
dpkg-source -x "$work"/src/u-boot_*.dsc "$work/u-boot" >/dev/null

cd "$work/u-boot"
export CROSS_COMPILE=aarch64-linux-gnu-
make -s O="$work/build" qemu_arm64_defconfig
cat >>"$work/build/.config" <<'EOF'
# CONFIG_ENV_IS_IN_FLASH is not set
CONFIG_ENV_IS_IN_MMC=y
CONFIG_SYS_MMC_ENV_DEV=0
CONFIG_SYS_MMC_ENV_PART=0
CONFIG_SYS_REDUNDAND_ENVIRONMENT=y
CONFIG_ENV_OFFSET=0x100000
CONFIG_ENV_OFFSET_REDUND=0x120000
CONFIG_ENV_SIZE=0x20000
CONFIG_MMC=y
CONFIG_DM_MMC=y
CONFIG_CMD_MMC=y
CONFIG_MMC_SDHCI=y
CONFIG_MMC_PCI=y
# CONFIG_TOOLS_MKEFICAPSULE is not set
EOF
make -s O="$work/build" olddefconfig 2>/dev/null
for want in CONFIG_ENV_IS_IN_MMC=y CONFIG_SYS_REDUNDAND_ENVIRONMENT=y CONFIG_ENV_OFFSET_REDUND=0x120000 CONFIG_MMC_PCI=y; do
    grep -qx "$want" "$work/build/.config" || { echo "build-redundant.sh: $want did not stick" >&2; exit 2; }
done
# The SD controller sits on PCI, which U-Boot enumerates after loading the environment unless the
# board asks for it early (a board-header define, not a Kconfig option in 2023.01).
make -s O="$work/build" -j"$(nproc)" KCFLAGS=-DCONFIG_SYS_EARLY_PCI_INIT u-boot.bin
cp "$work/build/u-boot.bin" "$out/u-boot.bin.new"
cp "$work/build/.config" "$out/config"
mv "$out/u-boot.bin.new" "$out/u-boot.bin"
rm -rf "$work"
echo "build-redundant.sh: $out/u-boot.bin" >&2
