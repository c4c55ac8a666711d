//! Instances as processes, where there is no Docker engine: the record's artifact is a static
//! executable, run by a `proxy` in service mode that supervises it (`proxy -- EXECUTABLE
//! ARGS`), with the environment a container would get.
//!
//! Each instance has a directory under the allocator's data directory holding the executable,
//! the log of both programs, and `instance.json` (process ID, its start time, labels). The
//! process runs in a session of its own, so it outlives an allocator that restarts, which then
//! adopts it from that file; the start time guards against a recycled process ID.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::Launch;
use crate::{
    allocator::book::{Instance, LABEL_ALLOCATOR},
    blob::BlobStore,
    lookup::{Artifact, ServiceRecord},
};

const STATE_FILE: &str = "instance.json";
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Instances as processes: a proxy in service mode running the service's executable, one
/// directory per instance.
pub struct ProcessRuntime {
    proxy: PathBuf,
    dir: PathBuf,
}

/// What `instance.json` holds.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    pid: u32,
    /// Field 22 of /proc/PID/stat: with the PID, names this very process.
    start_time: u64,
    labels: BTreeMap<String, String>,
}

/// Accepts `record` if its artifact is an executable; an image archive needs Docker. Nothing
/// else is prepared: the executable is copied out of the blob store at start.
pub fn check_artifact(record: &ServiceRecord) -> Result<(), String> {
    match &record.artifact {
        Artifact::Executable { .. } => Ok(()),
        Artifact::DockerArchive { .. } => Err(format!(
            "'{}' is an image: it needs an allocator with a Docker engine (--runtime docker)",
            record.name
        )),
    }
}

/// The start time of process `pid`, if it exists and is not a zombie.
fn start_time(pid: u32) -> Option<u64> {
    stat_of(pid).map(|stat| stat.start_time)
}

/// What /proc/PID/stat says of a live (not zombie) process.
struct Stat {
    /// Its process group.
    group: u32,
    /// When it started, in clock ticks since boot.
    start_time: u64,
}

fn stat_of(pid: u32) -> Option<Stat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command name: state is field 3, pgrp field 5, starttime field 22.
    if fields.first() == Some(&"Z") {
        return None;
    }
    Some(Stat {
        group: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// The live processes of an instance: those in the process group its proxy leads (the proxy
/// starts a session of its own, and the service it supervises stays in it), started no
/// earlier than the proxy, so that a group ID reused after the instance is gone names nothing.
/// The proxy may be dead already while its service lives on (a service that ignores the
/// SIGTERM a dying proxy sends it).
fn processes_of(state: &State) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            stat_of(pid)
                .is_some_and(|stat| stat.group == state.pid && stat.start_time >= state.start_time)
        })
        .collect()
}

/// Sends `signal` to each of `pids`.
fn signal_all(pids: &[u32], signal: libc::c_int) {
    for &pid in pids {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(pid as libc::pid_t, signal) };
    }
}

impl ProcessRuntime {
    /// `proxy` is the proxy binary every instance runs; instances live under `dir`.
    pub fn new(proxy: PathBuf, dir: PathBuf) -> Result<Self, String> {
        if !proxy.is_file() {
            return Err(format!(
                "the proxy binary {} is missing (--proxy-binary names it)",
                proxy.display()
            ));
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Self { proxy, dir })
    }

    fn instance_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Copies the executable out of `blobs` (its digest checked) into the instance's
    /// directory and starts `proxy -- EXECUTABLE ARGS` there in a session of its own, both
    /// programs writing to `log`; returns the instance ID, `launch.name`.
    pub async fn start(&self, launch: &Launch<'_>, blobs: &BlobStore) -> Result<String, String> {
        let Artifact::Executable { command } = &launch.record.artifact else {
            return check_artifact(launch.record).map(|()| String::new());
        };
        let id = launch.name.clone();
        let dir = self.instance_dir(&id);
        let io = |what: &str, e: std::io::Error| format!("cannot {what} in {}: {e}", dir.display());
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| io("create", e))?;
        // The executable, copied out of the store after checking its digest.
        let executable = dir.join("service");
        let (mut blob, _) = blobs
            .open_verified(launch.record.digest)
            .await
            .map_err(|e| e.to_string())?;
        let mut file = tokio::fs::File::create(&executable)
            .await
            .map_err(|e| io("write the executable", e))?;
        tokio::io::copy(&mut blob, &mut file)
            .await
            .map_err(|e| io("write the executable", e))?;
        drop(file);
        use std::os::unix::fs::PermissionsExt;
        tokio::fs::set_permissions(&executable, std::fs::Permissions::from_mode(0o755))
            .await
            .map_err(|e| io("make the executable runnable", e))?;

        let log = std::fs::File::create(dir.join("log")).map_err(|e| io("create the log", e))?;
        let mut spawn = std::process::Command::new(&self.proxy);
        spawn
            .arg("--")
            .arg(&executable)
            .args(command.iter().skip(1))
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| io("open the log", e))?)
            .stderr(log);
        // SAFETY: setsid(2) is async-signal-safe and touches no memory of ours.
        unsafe {
            use std::os::unix::process::CommandExt;
            spawn.pre_exec(|| {
                // A session of its own: a Ctrl-C or restart of the allocator leaves it running.
                libc::setsid();
                Ok(())
            });
        }
        let mut child = spawn
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.proxy.display()))?;
        let pid = child.id();
        // Reaped when it exits, so that it does not linger as a zombie.
        std::thread::spawn(move || child.wait());
        let state = State {
            pid,
            start_time: start_time(pid).unwrap_or_default(),
            labels: launch.labels.clone(),
        };
        let json = serde_json::to_vec_pretty(&state).expect("state serializes");
        tokio::fs::write(dir.join(STATE_FILE), json)
            .await
            .map_err(|e| io("write the instance state", e))?;
        Ok(id)
    }

    fn state(&self, id: &str) -> Option<State> {
        let bytes = std::fs::read(self.instance_dir(id).join(STATE_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn alive(state: &State) -> bool {
        start_time(state.pid).is_some_and(|t| t == state.start_time)
    }

    /// Whether the process of instance `id` is alive: the process ID in `instance.json` names
    /// a live process with the recorded start time.
    pub fn is_running(&self, id: &str) -> bool {
        self.state(id).is_some_and(|s| Self::alive(&s))
    }

    /// Sends SIGTERM to the instance's processes (its proxy and the service it runs, even
    /// one that outlived its proxy), SIGKILL to those still alive after 5 s, and removes the
    /// instance's directory.
    pub async fn stop(&self, id: &str) -> Result<(), String> {
        if let Some(state) = self.state(id) {
            signal_all(&processes_of(&state), libc::SIGTERM);
            let give_up = tokio::time::Instant::now() + STOP_GRACE;
            while !processes_of(&state).is_empty() && tokio::time::Instant::now() < give_up {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            signal_all(&processes_of(&state), libc::SIGKILL);
        }
        remove_dir(&self.instance_dir(id)).await
    }

    /// Every instance whose `instance.json` labels it as `allocator`'s, and whether its
    /// process is alive.
    pub fn list(&self, allocator: &str) -> Vec<(Instance, bool)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| {
                let id = entry.file_name().to_str()?.to_owned();
                let state = self.state(&id)?;
                if state.labels.get(LABEL_ALLOCATOR).map(String::as_str) != Some(allocator) {
                    return None;
                }
                let instance = Instance::from_labels(&id, &state.labels)?;
                Some((instance, Self::alive(&state)))
            })
            .collect()
    }
}

async fn remove_dir(dir: &Path) -> Result<(), String> {
    match tokio::fs::remove_dir_all(dir).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(format!("cannot remove {}: {e}", dir.display()))
        }
        _ => Ok(()),
    }
}
