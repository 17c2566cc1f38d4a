//! Generates the gRPC client and server from `flightnode/v1/hub.proto` with `protox`, a protobuf
//! compiler written in Rust, so a Rust toolchain alone builds the workspace (no `protoc`).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=flightnode/v1/hub.proto");
    let descriptors = protox::compile(["flightnode/v1/hub.proto"], ["."])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
