//! `/mtc/allocator/start/1`: a proxy asks an allocator to start an instance of a service.
//!
//! The allocator answers once the instance is started. The instance is ready when its sidecar
//! appears as a provider of the service's instance key (`ServiceRecord::instance_key`) on the
//! overlay, which it advertises once its service answers: the requester watches for that
//! rather than trusting an address in the answer, so an instance is only used once its proxy
//! and service really serve.

use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

use crate::rpc::Protocol;

/// Allocators advertise themselves under this namespace.
pub const NAMESPACE: &str = "allocator";

/// The contract between an allocator and each instance it starts (sidecar-image/README.md):
/// the environment it gives the instance's proxy, and the metric of that proxy it culls on.
/// Both sides use these names, so they cannot drift apart.
pub mod instance {
    /// The service's name in the lookup: the proxy's SERVICE argument.
    pub const SERVICE_NAME: &str = "SERVICE_NAME";
    /// How the service is spoken to (`http`, `tcp`, `udp`): the proxy's `--protocol`.
    pub const SERVICE_PROTOCOL: &str = "SERVICE_PROTOCOL";
    /// The proxy's data-plane port: its PORT argument.
    pub const PROXY_PORT: &str = "PROXY_PORT";
    /// The address other machines reach the instance at; with [`SERVICE_PORT`], where the
    /// service listens.
    pub const PROXY_IP: &str = "PROXY_IP";
    /// The port the service listens on.
    pub const SERVICE_PORT: &str = "SERVICE_PORT";
    /// The port of the proxy's /metrics: its METRICS_PORT argument.
    pub const METRICS_PORT: &str = "METRICS_PORT";
    /// Where the proxy's data plane (QUIC) binds: its `--quic-addr`. An allocator sets it,
    /// and the other listen addresses, to [`PROXY_IP`], so an instance listens on the address
    /// the allocator was told to use (`--host-ip`) and on no other interface.
    pub const QUIC_ADDR: &str = "MTC_QUIC_ADDR";
    /// Seconds since the proxy last served a request: the allocator culls an instance whose
    /// proxy says it has been idle past the idle timeout.
    pub const IDLE_METRIC: &str = "proxy_seconds_since_last_request";
}

/// The start protocol: a [`StartRequest`] asks an allocator to start an instance, and a
/// [`StartResponse`] says whether it did.
pub struct StartProtocol;

impl Protocol for StartProtocol {
    const ID: StreamProtocol = StreamProtocol::new("/mtc/allocator/start/1");
    const MAX_REQUEST_BYTES: u32 = 4 * 1024;
    const MAX_RESPONSE_BYTES: u32 = 64 * 1024;
    type Request = StartRequest;
    type Response = StartResponse;
}

/// A request to start an instance of `service`, running the artifact `digest` names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRequest {
    /// The service's name in the lookup.
    pub service: String,
    /// The digest of its artifact, as the lookup record names it (`sha256:<hex>`); the
    /// allocator refuses to run anything else.
    pub digest: String,
}

/// An allocator's answer to a [`StartRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartResponse {
    /// An instance was started (or one already starting was reused): `instance` names it on
    /// the allocator's machine (a container or process ID). It is ready when a provider of the
    /// service's instance key appears.
    Started {
        /// The instance's ID on the allocator's machine: a container ID or a process ID.
        instance: String,
        /// True if the allocator answered with an instance of the same service and digest it
        /// had started within its reuse window, instead of starting a new one.
        reused: bool,
    },
    /// Nothing was started; the text says why.
    Refused(String),
}
