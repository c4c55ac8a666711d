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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LookupRequest {
    /// Store (or replace) a record. Its blob must already be stored at the lookup service.
    Add(ServiceRecord),
    Get(String),
    List,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LookupResponse {
    Added,
    Found(ServiceRecord),
    NotFound,
    Services(Vec<ServiceRecord>),
    Deleted(u64),
    /// The request was refused or failed; the text says why.
    Failed(String),
}
