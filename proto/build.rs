//! Generates the gRPC client and server from `flightnode/v1/hub.proto` (needs `protoc`: Debian's
//! `protobuf-compiler`, or set PROTOC).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=flightnode/v1/hub.proto");
    tonic_prost_build::configure().compile_protos(&["flightnode/v1/hub.proto"], &["."])?;
    Ok(())
}
