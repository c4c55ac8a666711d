//! Instances as Docker containers, through the engine's API (bollard): images loaded from the
//! overlay's blobs (`docker load`), host networking (the allocator gives each instance its
//! ports), CPU and memory limits from the record, labels naming the allocator.

use std::collections::HashMap;

use bollard::{
    Docker,
    models::{ContainerCreateBody, ContainerSummaryStateEnum, HostConfig},
    query_parameters::{
        CreateContainerOptions, ImportImageOptions, ListContainersOptions, RemoveContainerOptions,
        StopContainerOptions,
    },
};
use futures::StreamExt;

use super::Launch;
use crate::{
    allocator::book::{Instance, LABEL_ALLOCATOR},
    blob::BlobStore,
    lookup::{Artifact, ServiceRecord},
};

/// How long a container may take to stop after SIGTERM before the engine kills it.
const STOP_SECONDS: i32 = 5;

/// Instances as containers of the local Docker engine.
pub struct DockerRuntime {
    docker: Docker,
}

fn image_of(record: &ServiceRecord) -> Result<String, String> {
    match &record.artifact {
        Artifact::DockerArchive { image_id, .. } => Ok(image_id.to_string()),
        Artifact::Executable { .. } => Err(format!(
            "'{}' is an executable, not an image: it needs an allocator with --runtime process",
            record.name
        )),
    }
}

impl DockerRuntime {
    /// Connects to the local engine (DOCKER_HOST or /var/run/docker.sock) at the API version
    /// it speaks; an error when there is none.
    pub async fn connect() -> Result<Self, String> {
        let docker = Docker::connect_with_local_defaults()
            .map_err(|e| format!("no Docker engine: {e}"))?
            .negotiate_version()
            .await
            .map_err(|e| format!("the Docker engine does not answer: {e}"))?;
        docker
            .ping()
            .await
            .map_err(|e| format!("the Docker engine does not answer: {e}"))?;
        Ok(Self { docker })
    }

    /// Loads `record`'s image archive from `blobs` into the engine (`docker load`) unless the
    /// engine has the image already, then checks that it now holds the record's image ID.
    pub async fn prepare(&self, record: &ServiceRecord, blobs: &BlobStore) -> Result<(), String> {
        let image = image_of(record)?;
        if self.docker.inspect_image(&image).await.is_ok() {
            return Ok(());
        }
        let (file, _) = blobs
            .open_verified(record.digest)
            .await
            .map_err(|e| e.to_string())?;
        let chunks = tokio_util::io::ReaderStream::new(file);
        let mut loading =
            self.docker
                .import_image_stream(ImportImageOptions::default(), chunks, None);
        while let Some(progress) = loading.next().await {
            let progress = progress.map_err(|e| format!("docker load failed: {e}"))?;
            if let Some(detail) = progress.error_detail {
                return Err(format!(
                    "docker load failed: {}",
                    detail.message.unwrap_or_default()
                ));
            }
        }
        // The record's digest covered the archive, and the archive's image ID was checked when
        // the record was added; check that the engine now has that very image.
        self.docker.inspect_image(&image).await.map_err(|_| {
            format!(
                "the archive of '{}' did not hold image {image}",
                record.name
            )
        })?;
        Ok(())
    }

    /// Creates and starts a container for `launch` (host network, the record's CPU and memory
    /// limits); returns its ID. A container that fails to start is removed.
    pub async fn start(&self, launch: &Launch<'_>) -> Result<String, String> {
        let image = image_of(launch.record)?;
        let limits = &launch.record.limits;
        let body = ContainerCreateBody {
            image: Some(image),
            env: Some(launch.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(launch.labels.clone().into_iter().collect::<HashMap<_, _>>()),
            host_config: Some(HostConfig {
                network_mode: Some("host".into()),
                nano_cpus: limits.cpu_cores.map(|cores| (cores * 1e9) as i64),
                memory: limits.memory_bytes.map(|bytes| bytes as i64),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(launch.name.clone()),
            ..Default::default()
        };
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| format!("cannot create the container: {e}"))?;
        if let Err(error) = self.docker.start_container(&created.id, None).await {
            let _ = self.remove(&created.id).await;
            return Err(format!("cannot start the container: {error}"));
        }
        Ok(created.id)
    }

    /// Stops container `id` (SIGTERM, killed after 5 s) and removes it; one that already
    /// exited is only removed.
    pub async fn stop(&self, id: &str) -> Result<(), String> {
        let options = StopContainerOptions {
            t: Some(STOP_SECONDS),
            ..Default::default()
        };
        // Stopping one that already exited is fine; removing it is what matters.
        let _ = self.docker.stop_container(id, Some(options)).await;
        self.remove(id).await
    }

    async fn remove(&self, id: &str) -> Result<(), String> {
        let options = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        self.docker
            .remove_container(id, Some(options))
            .await
            .map_err(|e| format!("cannot remove container {id}: {e}"))
    }

    /// Whether container `id` runs (false when it is gone); `None` when the engine cannot
    /// say, so that a moment of engine trouble never reads as "exited" (and culls a running
    /// container).
    pub async fn is_running(&self, id: &str) -> Option<bool> {
        match self.docker.inspect_container(id, None).await {
            Ok(container) => Some(container.state.and_then(|s| s.running).unwrap_or(false)),
            // Gone: certainly not running.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Some(false),
            // The engine could not say (restarting, overloaded): no verdict.
            Err(error) => {
                tracing::warn!(%id, %error, "cannot ask the engine whether a container runs");
                None
            }
        }
    }

    /// Every container, running or not, labelled as `allocator`'s, and whether it runs;
    /// containers with incomplete labels are left out.
    pub async fn list(&self, allocator: &str) -> Result<Vec<(Instance, bool)>, String> {
        let options = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([(
                "label".to_owned(),
                vec![format!("{LABEL_ALLOCATOR}={allocator}")],
            )])),
            ..Default::default()
        };
        let containers = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| format!("cannot list containers: {e}"))?;
        Ok(containers
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels?.into_iter().collect();
                let instance = Instance::from_labels(c.id.as_deref()?, &labels)?;
                let running = c.state == Some(ContainerSummaryStateEnum::RUNNING);
                Some((instance, running))
            })
            .collect())
    }
}
