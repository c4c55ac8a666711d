//! Service records, the lookup protocol between clients and lookup services, and the client
//! side of it. The lookup services themselves (hl-service, its stores) are `control::lookup`'s.

pub mod client;
pub mod protocol;
pub mod record;

pub use record::{Artifact, Limits, ServiceProtocol, ServiceRecord};
