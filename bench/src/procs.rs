//! Running the project's release binaries as separate processes and reading their footprint
//! from /proc.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use control::overlay::BootstrapAddr;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// A binary built beside this benchmark (same profile).
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found: build it first with `cargo build --release --workspace`",
            path.display()
        );
    }
    Ok(path)
}

/// A field of /proc/PID/status in kB (VmRSS, VmHWM).
pub fn status_kb(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim_start_matches(':')
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// A size in kB (as /proc and rusage give it) in MiB.
pub fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

/// User plus system CPU time of a process, from /proc/PID/stat (clock ticks of 10 ms).
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 10))
}

/// A child process, killed when dropped; its standard output is drained in the background
/// once read, so it never blocks on a full pipe.
pub struct Process {
    /// Held so the process is killed when this is dropped.
    _child: Child,
    pub pid: u32,
}

/// Starts `program` with `args` (no overlay settings inherited from the environment) and
/// reads its standard output line by line until `wanted` picks what the caller waits for
/// (an address it prints once it is ready).
pub async fn spawn_reading<T>(
    program: &Path,
    args: &[&str],
    mut wanted: impl FnMut(&str) -> Option<T>,
) -> anyhow::Result<(Process, T)> {
    let mut child = Command::new(program)
        .args(args)
        .env_remove("P2P_BOOTSTRAPS")
        .env_remove("P2P_PSK")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    let pid = child.id().context("exited at once")?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let found = loop {
        let line = lines.next_line().await?.with_context(|| {
            format!(
                "{} exited before printing what was awaited",
                program.display()
            )
        })?;
        if let Some(found) = wanted(&line) {
            break found;
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((Process { _child: child, pid }, found))
}

/// A long-running overlay program of ours, killed when dropped.
pub struct Daemon {
    /// Held so the process is killed when the daemon is dropped.
    _process: Process,
    pub pid: u32,
    pub bootstrap: BootstrapAddr,
}

/// Flags every benchmarked daemon gets: a throw-away identity and free loopback ports.
const LOOPBACK: [&str; 5] = [
    "--ephemeral",
    "--p2p-listen-addr",
    "127.0.0.1:0",
    "--prom-listen-addr",
    "127.0.0.1:0",
];

/// Starts binary `name` on loopback with `args` and waits for the overlay address it prints.
pub async fn start_daemon(name: &str, args: &[&str]) -> anyhow::Result<Daemon> {
    let all: Vec<&str> = LOOPBACK.iter().chain(args).copied().collect();
    let (process, bootstrap) = spawn_reading(&sibling_binary(name)?, &all, |line| {
        line.contains("/p2p/")
            .then(|| line.parse::<BootstrapAddr>())
    })
    .await?;
    Ok(Daemon {
        pid: process.pid,
        _process: process,
        bootstrap: bootstrap.map_err(anyhow::Error::msg)?,
    })
}

/// Runs a binary to completion; returns its wall time and peak RSS in kB (from wait4's
/// rusage, so it covers the whole run).
pub fn run_measured(name: &str, args: &[&str]) -> anyhow::Result<(Duration, u64)> {
    let start = std::time::Instant::now();
    let child = std::process::Command::new(sibling_binary(name)?)
        .args(args)
        .env_remove("P2P_BOOTSTRAPS")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value, and wait4 only writes into the two
    // out-parameters we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if waited != pid || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{name} {args:?} failed (status {status})");
    }
    Ok((start.elapsed(), usage.ru_maxrss as u64))
}
