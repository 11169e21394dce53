//! Compiles `proto/` into the contract crate: prost messages, tonic client and
//! server, and the encoded file descriptor set that server reflection serves.
//! `protoc` comes from `protoc-bin-vendored`, so no system install is needed.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let protos = [
        "proto/orders/v1/order.proto",
        "proto/orders/v1/order_service.proto",
        "proto/orders/v1/events.proto",
    ];
    // The well-known types (google/protobuf/timestamp.proto) ship with protoc.
    let includes = [PathBuf::from("proto"), protoc_bin_vendored::include_path()?];
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Default stubs: a server method nobody implemented answers UNIMPLEMENTED,
    // so adding an RPC to the contract (a compatible change) does not break
    // the servers that implement the service for other purposes (the
    // benchmark's ceilings), as grpc-go's embedded Unimplemented server does.
    tonic_prost_build::configure()
        .generate_default_stubs(true)
        .file_descriptor_set_path(out_dir.join("orders_descriptor.bin"))
        .compile_with_config(config, &protos.map(PathBuf::from), &includes)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
