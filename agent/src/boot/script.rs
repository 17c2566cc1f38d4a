//! Script backend (to be implemented): a user script with RAUC-like verbs.

/// Placeholder.
pub struct Script;
