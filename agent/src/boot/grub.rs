//! GRUB environment backend (to be implemented): `grub-editenv`, RAUC's `ORDER`/`<slot>_OK`/`<slot>_TRY`.

/// Placeholder.
pub struct Grub;
