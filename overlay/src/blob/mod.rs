//! Content-addressed blobs (image archives, executables): stored on disk by SHA-256 digest
//! and moved between overlay nodes, so no container registry is needed anywhere.

mod digest;
mod store;
pub mod transfer;

pub use digest::Digest;
pub use store::{BlobError, BlobStore, DEFAULT_MAX_BLOB_BYTES, hash_file};
