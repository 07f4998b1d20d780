//! Generates the gRPC test service from `proto/work.proto` (protoc comes from `cargo xtask setup`).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/work.proto"], &["proto"])?;
    Ok(())
}
