//! Generates the gRPC test service from `proto/work.proto`.
//!
//! `protoc` comes from the `protoc-bin-vendored` crate unless `PROTOC` names
//! one, so the library (which `cargo xtask setup` is built with) compiles on a
//! fresh machine before any Debian package is installed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing reads the
        // environment concurrently.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/work.proto"], &["proto"])?;
    Ok(())
}
