# The virtual board's U-Boot boot script: RAUC's A/B slot selection (RAUC contrib/uboot.sh:
# BOOT_ORDER, BOOT_x_LEFT as hex counters, `setexpr`, `saveenv`; "no slot left: reset every
# counter and reset"), then the chosen slot's own Debian kernel and initrd are loaded from its
# ext4 root filesystem (slot A = partition 2, slot B = partition 3 of the virtio disk).
# Compiled with `mkimage -A arm64 -O linux -T script -C none -d boot.cmd boot.scr`; Debian's
# u-boot-qemu finds /boot.scr on partition 1 with its stock distro_bootcmd.
#
# The A/B variables live in an environment block on the disk (512 KiB from its start, 256 KiB,
# U-Boot's own format: CRC32 + name=value data), not in U-Boot's pflash environment: Debian's
# arm64 kernel has no CFI flash driver, so Linux (fw_setenv) could not write them there.
# `fn_save` stands in for RAUC's `saveenv`.
setenv fn_env 0x4f000000
setenv fn_save "env export -c -s 0x40000 ${fn_env} BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT && virtio write ${fn_env} 0x400 0x200"
virtio dev 0
if virtio read ${fn_env} 0x400 0x200 && env import -c ${fn_env} 0x40000 BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT; then
  echo "FLIGHTNODE-ENV BOOT_ORDER=${BOOT_ORDER} BOOT_A_LEFT=${BOOT_A_LEFT} BOOT_B_LEFT=${BOOT_B_LEFT}"
else
  echo "FLIGHTNODE-ENV no valid A/B block on the disk"
fi
test -n "${BOOT_ORDER}" || setenv BOOT_ORDER "A B"
test -n "${BOOT_A_LEFT}" || setenv BOOT_A_LEFT 3
test -n "${BOOT_B_LEFT}" || setenv BOOT_B_LEFT 3

setenv bootargs
fn_slot=
fn_part=
for BOOT_SLOT in "${BOOT_ORDER}"; do
  if test "x${bootargs}" != "x"; then
    # a slot was chosen already
  elif test "x${BOOT_SLOT}" = "xA"; then
    if test 0x${BOOT_A_LEFT} -gt 0; then
      setexpr BOOT_A_LEFT ${BOOT_A_LEFT} - 1
      echo "Found valid slot A, ${BOOT_A_LEFT} attempts remaining"
      fn_slot=A
      fn_part=2
      setenv bootargs "console=ttyAMA0 root=/dev/vda2 rootwait rw panic=5 rauc.slot=A"
    fi
  elif test "x${BOOT_SLOT}" = "xB"; then
    if test 0x${BOOT_B_LEFT} -gt 0; then
      setexpr BOOT_B_LEFT ${BOOT_B_LEFT} - 1
      echo "Found valid slot B, ${BOOT_B_LEFT} attempts remaining"
      fn_slot=B
      fn_part=3
      setenv bootargs "console=ttyAMA0 root=/dev/vda3 rootwait rw panic=5 rauc.slot=B"
    fi
  fi
done

if test -n "${bootargs}"; then
  run fn_save
else
  echo "No valid slot found, resetting tries to 3"
  setenv BOOT_A_LEFT 3
  setenv BOOT_B_LEFT 3
  run fn_save
  echo "FLIGHTNODE-RESET no slot left"
  reset
fi

echo "FLIGHTNODE-BOOT slot=${fn_slot}"
# Debian's arm64 vmlinuz is a plain Image: booti takes it as it is.
if load virtio 0:${fn_part} ${kernel_addr_r} /boot/vmlinuz && load virtio 0:${fn_part} ${ramdisk_addr_r} /boot/initrd.img; then
  booti ${kernel_addr_r} ${ramdisk_addr_r}:${filesize} ${fdtcontroladdr}
fi
# A slot whose kernel cannot be loaded costs one attempt, like one that does not come up.
echo "FLIGHTNODE-NOKERNEL slot=${fn_slot}"
reset
