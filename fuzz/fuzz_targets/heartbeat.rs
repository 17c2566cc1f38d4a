#![no_main]
//! The hub's heartbeat handling: any bytes decoded as a `HeartbeatRequest` are refused by
//! validation or become a status, an object name and a session update, never a panic.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    flightnode_hub::heartbeat::fuzzing::heartbeat(data);
});
