//! Generates the gRPC code from proto/*.proto (needs `protoc`, installed by
//! scripts/setup), and a descriptor set for the schema tests.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("descriptor.bin"))
        // Holds a password: its Debug (in proto/src/lib.rs) shows none.
        .skip_debug([".guestkey.admin.v1.SetConsoleUserRequest"])
        .compile_protos(
            &["proto/admin.proto", "proto/host.proto", "proto/agent.proto"],
            &["proto"],
        )?;
    Ok(())
}
