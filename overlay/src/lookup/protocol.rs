//! The lookup protocol between clients (hl-cli, proxies, allocators) and lookup services.

use serde::{Deserialize, Serialize};

use super::record::ServiceRecord;
use crate::rpc::Protocol;
use libp2p::StreamProtocol;

/// Lookup services advertise themselves under this namespace.
pub const NAMESPACE: &str = "lookup";

/// `/mtc/lookup/1`: add, get, list and delete records.
pub struct LookupProtocol;

impl Protocol for LookupProtocol {
    const ID: StreamProtocol = StreamProtocol::new("/mtc/lookup/1");
    const MAX_REQUEST_BYTES: u32 = 64 * 1024;
    const MAX_RESPONSE_BYTES: u32 = 16 * 1024 * 1024;
    type Request = LookupRequest;
    type Response = LookupResponse;
}

/// A request to a lookup service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LookupRequest {
    /// Store (or replace) a record. Its blob must already be stored at the lookup service.
    Add(ServiceRecord),
    /// Get the record of the service with this name.
    Get(String),
    /// Get every record the lookup service holds.
    List,
    /// Delete the record of the service with this name.
    Delete(String),
}

impl LookupRequest {
    /// The operation's name, for metrics and messages.
    pub fn op(&self) -> &'static str {
        match self {
            Self::Add(_) => "add",
            Self::Get(_) => "get",
            Self::List => "list",
            Self::Delete(_) => "delete",
        }
    }
}

/// A lookup service's answer to a [`LookupRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LookupResponse {
    /// The record of an `Add` was stored.
    Added,
    /// The record a `Get` asked for.
    Found(ServiceRecord),
    /// A `Get` named a service that has no record.
    NotFound,
    /// The answer to a `List`: every record that could be read (unreadable ones are skipped).
    Services(Vec<ServiceRecord>),
    /// The answer to a `Delete`: how many records were deleted (0 if the name had none).
    Deleted(u64),
    /// The request was refused (a bad name, a record without its blob); the text says why.
    /// Another lookup service would answer the same.
    Failed(String),
    /// The lookup service's record store failed (its etcd member down, a disk error); the
    /// text says why. Another lookup service may answer: clients ask the next.
    Unavailable(String),
}
