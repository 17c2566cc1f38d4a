//! slot backends (skeleton)
