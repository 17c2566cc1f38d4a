//! activation (skeleton)
