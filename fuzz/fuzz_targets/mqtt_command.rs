#![no_main]
//! The MQTT command parser: any payload is a command or a `Malformed` reason, never a panic.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    flightnode_agent::fuzzing::mqtt_command(data);
});
