//! Compiles the Open Inference Protocol's gRPC service (proto/open_inference_grpc.proto, from
//! kserve/open-inference-protocol, plus three of Triton's extensions) into tonic server code.
//! Needs `protoc` (scripts/setup-system.sh installs it).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/open_inference_grpc.proto");
    tonic_prost_build::configure()
        .build_client(false)
        .compile_protos(&["proto/open_inference_grpc.proto"], &["proto"])?;
    Ok(())
}
