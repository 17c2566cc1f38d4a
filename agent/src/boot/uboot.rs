//! U-Boot environment backend (to be implemented): `fw_printenv`/`fw_setenv`, RAUC's `BOOT_ORDER`/`BOOT_<slot>_LEFT`.

/// Placeholder.
pub struct UBoot;
