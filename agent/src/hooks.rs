//! hooks (skeleton)
