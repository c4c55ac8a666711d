//! Service lookup: a service name resolves to a [`ServiceRecord`] (which artifact, its
//! digest, limits), kept by lookup services (`hl-service`) that also hold the artifacts
//! themselves as blobs. `hl-cli` adds, gets, lists and deletes records.

#[cfg(feature = "etcd")]
pub mod app;
pub mod archive;
pub mod cli;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod replicate;
pub mod service;
pub mod store;

pub use mtc_overlay::lookup::{
    Artifact, Limits, ServiceProtocol, ServiceRecord, client, protocol, record,
};
