//! Signed bundles: keys, creation, and the streaming reader that verifies before it writes.
//!
//! The layout is documented in [`flightnode_proto::manifest`].
