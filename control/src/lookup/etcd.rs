//! etcd as the record store of a cluster of lookup services.
//!
//! Three ways in, as `hl-service` flags: `--etcd-endpoints` uses a cluster that already runs;
//! `--new-etcd-cluster --etcd-ip IP` starts a one-member cluster (an `etcd` process from PATH,
//! supervised by hl-service); `--etcd-ip IP` alone joins the cluster of the lookup services
//! already on the overlay: it asks one of them over `/mtc/etcd-member-add/1` to add it as a
//! member, as the original system did, then starts its own etcd member. Records live under
//! [`KEY_PREFIX`], as JSON.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use etcd_client::{Client, ConnectOptions, GetOptions};
use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

use super::store::StoreError;
use crate::rpc::Protocol;

/// Keys of service records.
pub const KEY_PREFIX: &str = "/mtc/services/";
/// How long a starting etcd member may take to answer.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// Records in etcd.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
}

fn etcd_error(e: etcd_client::Error) -> StoreError {
    StoreError(format!("etcd: {e}"))
}

impl EtcdStore {
    /// Connects to the etcd cluster at `endpoints` (client URLs); connecting and each request
    /// may take 5 s at most.
    pub async fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(5));
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| {
                StoreError(format!(
                    "cannot connect to etcd at {}: {e}",
                    endpoints.join(",")
                ))
            })?;
        Ok(Self { client })
    }

    /// The etcd client, for cluster operations such as [`add_member`].
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Stores `value` (a record's JSON) as the record of `name`, replacing any.
    pub async fn put(&self, name: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.client
            .clone()
            .put(format!("{KEY_PREFIX}{name}"), value, None)
            .await
            .map_err(etcd_error)?;
        Ok(())
    }

    /// The value stored for `name`, if any.
    pub async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let response = self
            .client
            .clone()
            .get(format!("{KEY_PREFIX}{name}"), None)
            .await
            .map_err(etcd_error)?;
        Ok(response.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// Every (name, value) under [`KEY_PREFIX`], sorted by name.
    pub async fn list(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let options = GetOptions::new().with_prefix();
        let response = self
            .client
            .clone()
            .get(KEY_PREFIX, Some(options))
            .await
            .map_err(etcd_error)?;
        Ok(response
            .kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                (
                    key.trim_start_matches(KEY_PREFIX).to_owned(),
                    kv.value().to_vec(),
                )
            })
            .collect())
    }

    /// Deletes the record of `name`; returns how many records went (0 or 1).
    pub async fn delete(&self, name: &str) -> Result<u64, StoreError> {
        let response = self
            .client
            .clone()
            .delete(format!("{KEY_PREFIX}{name}"), None)
            .await
            .map_err(etcd_error)?;
        Ok(response.deleted().max(0) as u64)
    }
}

/// Where an etcd member listens; its name is `<ip>-<client port>-<peer port>` as the
/// original named members.
#[derive(Debug, Clone)]
pub struct MemberSpec {
    /// The IP the member listens on and advertises, to clients and to other members.
    pub ip: IpAddr,
    /// The port clients (the lookup services' [`EtcdStore`]s) connect to.
    pub client_port: u16,
    /// The port other members of the cluster connect to.
    pub peer_port: u16,
    /// etcd's `--data-dir`; the member's log is written next to it, with the extension `.log`.
    pub data_dir: PathBuf,
}

impl MemberSpec {
    /// The member's etcd name: `<ip>-<client port>-<peer port>`.
    pub fn name(&self) -> String {
        format!("{}-{}-{}", self.ip, self.client_port, self.peer_port)
    }

    fn url(&self, port: u16) -> String {
        match self.ip {
            IpAddr::V4(ip) => format!("http://{ip}:{port}"),
            IpAddr::V6(ip) => format!("http://[{ip}]:{port}"),
        }
    }

    /// `http://IP:CLIENT_PORT`: where clients reach the member.
    pub fn client_url(&self) -> String {
        self.url(self.client_port)
    }

    /// `http://IP:PEER_PORT`: where the other members reach this one.
    pub fn peer_url(&self) -> String {
        self.url(self.peer_port)
    }

    /// Whether this member ran before (its data directory holds a cluster already).
    pub fn has_data(&self) -> bool {
        self.data_dir.join("member").exists()
    }
}

/// An etcd process started and supervised by this program: restarted (from its own data,
/// with a backoff of 1 s doubling to 30 s) whenever it exits, and reaped each time; stopped
/// when this value is dropped, and (through the parent-death signal) if this program dies.
pub struct EtcdMember {
    stop: tokio_util::sync::CancellationToken,
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts `etcd` from PATH as `spec`, in a cluster described by `initial_cluster`
/// (`name=peer-url,...`), `new` or joining an `existing` one, waits until it answers, and
/// supervises it from then on (see [`EtcdMember`]).
pub async fn start_member(
    spec: &MemberSpec,
    initial_cluster: &str,
    existing: bool,
) -> Result<EtcdMember, StoreError> {
    std::fs::create_dir_all(&spec.data_dir)
        .map_err(|e| StoreError(format!("cannot create {}: {e}", spec.data_dir.display())))?;
    let child = spawn_member(spec, initial_cluster, existing)?;
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(supervise(
        spec.clone(),
        initial_cluster.to_owned(),
        child,
        stop.clone(),
    ));
    let member = EtcdMember { stop };
    answering(spec).await?;
    Ok(member)
}

/// Where the member's log goes: beside its data directory.
fn log_path(spec: &MemberSpec) -> PathBuf {
    spec.data_dir.with_extension("log")
}

/// Starts the `etcd` process of `spec` (its log appended to [`log_path`]).
fn spawn_member(
    spec: &MemberSpec,
    initial_cluster: &str,
    existing: bool,
) -> Result<tokio::process::Child, StoreError> {
    let log_path = log_path(spec);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| StoreError(format!("cannot open {}: {e}", log_path.display())))?;
    let mut command = tokio::process::Command::new("etcd");
    command
        .arg("--name")
        .arg(spec.name())
        .arg("--data-dir")
        .arg(&spec.data_dir)
        .arg("--listen-client-urls")
        .arg(spec.client_url())
        .arg("--advertise-client-urls")
        .arg(spec.client_url())
        .arg("--listen-peer-urls")
        .arg(spec.peer_url())
        .arg("--initial-advertise-peer-urls")
        .arg(spec.peer_url())
        .arg("--initial-cluster")
        .arg(initial_cluster)
        .arg("--initial-cluster-state")
        .arg(if existing { "existing" } else { "new" })
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of ours.
    unsafe {
        command.pre_exec(|| {
            // The member dies with us even if we are killed without a chance to clean up.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    command.spawn().map_err(|e| {
        StoreError(format!(
            "cannot start etcd (is it installed? scripts/setup.sh installs etcd-server): {e}"
        ))
    })
}

/// Waits until the member of `spec` answers a status request, for at most [`START_DEADLINE`].
async fn answering(spec: &MemberSpec) -> Result<(), StoreError> {
    let endpoint = spec.client_url();
    let give_up = tokio::time::Instant::now() + START_DEADLINE;
    loop {
        if let Ok(store) = EtcdStore::connect(std::slice::from_ref(&endpoint)).await
            && store.client().status().await.is_ok()
        {
            tracing::info!(name = %spec.name(), %endpoint, "etcd member running");
            return Ok(());
        }
        if tokio::time::Instant::now() >= give_up {
            return Err(StoreError(format!(
                "etcd member {} did not answer at {endpoint} within {START_DEADLINE:?}; see {}",
                spec.name(),
                log_path(spec).display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits on the member's process and starts it again whenever it exits (it rejoins from its
/// own data: the cluster flags are ignored then), until `stop`; then kills it.
async fn supervise(
    spec: MemberSpec,
    initial_cluster: String,
    mut child: tokio::process::Child,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut backoff = crate::overlay::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        let status = tokio::select! {
            status = child.wait() => status,
            () = stop.cancelled() => {
                let _ = child.kill().await;
                return;
            }
        };
        tracing::warn!(name = %spec.name(), ?status, log = %log_path(&spec).display(), "etcd member exited; starting it again");
        loop {
            tokio::select! {
                () = tokio::time::sleep(backoff.next_delay()) => {}
                () = stop.cancelled() => return,
            }
            match spawn_member(&spec, &initial_cluster, true) {
                Ok(started) => {
                    child = started;
                    break;
                }
                Err(error) => {
                    tracing::warn!(name = %spec.name(), %error, "cannot start the etcd member again")
                }
            }
        }
        let answered = tokio::select! {
            answered = answering(&spec) => answered.is_ok(),
            () = stop.cancelled() => {
                let _ = child.kill().await;
                return;
            }
        };
        if answered {
            backoff.reset();
        }
    }
}

/// `/mtc/etcd-member-add/1`: a lookup service joining the etcd cluster asks one that is in it.
pub struct MemberAddProtocol;

/// A request to add a member to the etcd cluster: the one the asking lookup service is about
/// to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberAddRequest {
    /// The new member's name ([`MemberSpec::name`]).
    pub name: String,
    /// The new member's peer URL ([`MemberSpec::peer_url`]).
    pub peer_url: String,
}

impl Protocol for MemberAddProtocol {
    const ID: StreamProtocol = StreamProtocol::new("/mtc/etcd-member-add/1");
    const MAX_REQUEST_BYTES: u32 = 4096;
    const MAX_RESPONSE_BYTES: u32 = 64 * 1024;
    type Request = MemberAddRequest;
    /// The `--initial-cluster` value the new member starts with, or why it was refused.
    type Response = Result<String, String>;
}

/// Adds a member to the cluster `client` talks to; returns the new member's initial cluster.
pub async fn add_member(mut client: Client, request: &MemberAddRequest) -> Result<String, String> {
    let response = client
        .member_add([request.peer_url.as_str()], None)
        .await
        .map_err(|e| {
            format!(
                "etcd refused member {} at {}: {e}",
                request.name, request.peer_url
            )
        })?;
    let members: Vec<String> = response
        .member_list()
        .iter()
        .flat_map(|member| {
            // The member just added has no name until it starts: it is the one asking.
            let name = if member.name().is_empty() {
                request.name.clone()
            } else {
                member.name().to_owned()
            };
            member
                .peer_urls()
                .iter()
                .map(move |url| format!("{name}={url}"))
        })
        .collect();
    Ok(members.join(","))
}

/// The etcd data directory of a member inside a lookup service's data directory.
pub fn member_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("etcd")
}
