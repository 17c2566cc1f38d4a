//! placeholder

pub mod http_server;
