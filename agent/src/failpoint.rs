//! failpoint (skeleton)
