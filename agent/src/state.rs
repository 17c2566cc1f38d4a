//! state (skeleton)
