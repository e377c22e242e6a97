use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps code generation working on a machine with only cargo.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment here.
    unsafe { std::env::set_var("PROTOC", protoc) };

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("ozfleet_descriptor.bin"))
        // The assignment carries Oz's `env_vars` (API keys, tokens): its Debug is hand-written.
        .skip_debug(["ozfleet.v1.TaskAssignment"])
        // Small per-stream buffers: an attach stream lives as long as its node.
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_protos(&["ozfleet/v1/node.proto", "ozfleet/v1/admin.proto"], &["."])?;
    Ok(())
}
