//! engine (skeleton)
