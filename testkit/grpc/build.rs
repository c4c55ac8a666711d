//! Generates the tonic client and server of proto/talk.proto (protoc comes from
//! scripts/setup.sh's protobuf-compiler, as etcd-client's does).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::compile_protos("proto/talk.proto")?;
    Ok(())
}
