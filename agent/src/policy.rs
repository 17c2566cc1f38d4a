//! policy (skeleton)
