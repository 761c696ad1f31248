//! Compiles the `.proto` files with a vendored `protoc`: no system install needed.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Pass protoc explicitly: setting PROTOC with `env::set_var` is unsafe in edition 2024.
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let include = protoc_bin_vendored::include_path()?;
    // Descriptor sets apart, so each server's reflection lists only what it serves.
    let sets: [(&str, &[&str]); 3] = [
        (
            "lookaside_descriptor.bin",
            &[
                "proto/lookaside/v1/lookaside.proto",
                "proto/grpc/lb/v1/load_balancer.proto",
            ],
        ),
        (
            "helloworld_descriptor.bin",
            &["proto/helloworld/helloworld.proto"],
        ),
        (
            "orca_descriptor.bin",
            &[
                "proto/xds/data/orca/v3/orca_load_report.proto",
                "proto/xds/service/orca/v3/orca.proto",
            ],
        ),
    ];
    for (descriptor, protos) in sets {
        let mut config = tonic_prost_build::Config::new();
        config.protoc_executable(&protoc);
        let protos: Vec<PathBuf> = protos.iter().map(PathBuf::from).collect();
        tonic_prost_build::configure()
            .file_descriptor_set_path(out.join(descriptor))
            .compile_with_config(config, &protos, &[PathBuf::from("proto"), include.clone()])?;
    }
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
