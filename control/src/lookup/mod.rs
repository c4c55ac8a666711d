//! Service lookup: a service name resolves to a [`ServiceRecord`] (which artifact, its
//! digest, limits), kept by lookup services (`hl-service`) that also hold the artifacts
//! themselves as blobs. `hl-cli` adds, gets, lists and deletes records.

#[cfg(feature = "etcd")]
pub mod app;
pub mod archive;
pub mod cli;
pub mod client;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod protocol;
pub mod record;
pub mod service;
pub mod store;

pub use record::{Artifact, Limits, ServiceProtocol, ServiceRecord};
