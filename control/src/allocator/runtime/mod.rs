//! Where instances run: Docker containers (`docker.rs`) or child processes (`process.rs`).
//! Both run the service beside its proxy with the same environment and labels, so the rest of
//! the allocator does not care which.

pub mod docker;
pub mod process;

use std::collections::BTreeMap;

use crate::{blob::BlobStore, lookup::ServiceRecord};

use super::book::Instance;

/// What starting one instance needs.
pub struct Launch<'a> {
    /// The service's record: its artifact, limits and protocol.
    pub record: &'a ServiceRecord,
    /// A name unique on this machine (the container's name, the process's directory).
    pub name: String,
    /// The instance's environment variables (SERVICE_NAME, PROXY_PORT, P2P_BOOTSTRAPS and the
    /// rest of the container contract).
    pub env: Vec<(String, String)>,
    /// Labels naming the instance as this allocator's ([`Instance::labels`]), so that it is
    /// adopted after a restart.
    pub labels: BTreeMap<String, String>,
}

/// The runtime an allocator starts its instances with, chosen once at start-up.
pub enum Runtime {
    /// Docker containers, for image archives.
    Docker(docker::DockerRuntime),
    /// Processes run by a proxy in service mode, for executables.
    Process(process::ProcessRuntime),
}

impl Runtime {
    /// `docker` or `process`, as printed at start-up.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Docker(_) => "docker",
            Self::Process(_) => "process",
        }
    }

    /// Makes `record`'s artifact (already verified in `blobs`) runnable here: an image is
    /// loaded into the engine unless it has it; an executable needs nothing yet.
    pub async fn prepare(&self, record: &ServiceRecord, blobs: &BlobStore) -> Result<(), String> {
        match self {
            Self::Docker(docker) => docker.prepare(record, blobs).await,
            Self::Process(_) => process::check_artifact(record),
        }
    }

    /// Starts an instance; returns its ID.
    pub async fn start(&self, launch: &Launch<'_>, blobs: &BlobStore) -> Result<String, String> {
        match self {
            Self::Docker(docker) => docker.start(launch).await,
            Self::Process(process) => process.start(launch, blobs).await,
        }
    }

    /// Stops an instance and removes what it left.
    pub async fn stop(&self, id: &str) -> Result<(), String> {
        match self {
            Self::Docker(docker) => docker.stop(id).await,
            Self::Process(process) => process.stop(id).await,
        }
    }

    /// Whether instance `id` runs (false when it is gone); `None` when the runtime cannot say
    /// now (the engine does not answer), which is no verdict.
    pub async fn is_running(&self, id: &str) -> Option<bool> {
        match self {
            Self::Docker(docker) => docker.is_running(id).await,
            Self::Process(process) => Some(process.is_running(id)),
        }
    }

    /// Every instance labelled as `allocator`'s, and whether it is running.
    pub async fn list(&self, allocator: &str) -> Result<Vec<(Instance, bool)>, String> {
        match self {
            Self::Docker(docker) => docker.list(allocator).await,
            Self::Process(process) => Ok(process.list(allocator)),
        }
    }
}
