#![no_main]
//! The bundle reader and verifier: any byte stream is verified or refused with a code, never a
//! panic, and never more than the manifest's `size` bytes reach the slot.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    flightnode_agent::fuzzing::bundle_reader(data);
});
