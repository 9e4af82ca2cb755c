//! Generates the gRPC code from `proto/l2l.proto` with a vendored protoc, so a fresh
//! machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        // φ travels as bytes encoded once per version; `Bytes` clones share them.
        .bytes(".l2l.v1.FetchPhiReply.phi")
        .bytes(".l2l.v1.ValidateReply.phi")
        .bytes(".l2l.v1.SubmitRequest.grad")
        .bytes(".l2l.v1.SubmitBatchReply.phi")
        .compile_protos(&["proto/l2l.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/l2l.proto");
    Ok(())
}
