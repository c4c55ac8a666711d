//! The `faults` scenario (issue #16): what a steady load through an ingress sees when one
//! program of the system is killed or frozen, and what each fault leaves behind.
//!
//! All on loopback, as processes: a ping-monitor (the bootstrap, with a key file and a fixed
//! port, so that a restart is the same bootstrap), hl-services (three sharing an etcd cluster
//! that the first creates and the others join through the overlay, or one with the embedded
//! store), `hello` (helloworldserver) registered with hl-cli, one allocator with the process
//! runtime (a key file and a data directory, so that a restart is the same allocator and adopts
//! its instances; no reuse window, so that two start requests make two instances; never culling
//! an instance as idle), two instances of `hello` asked of it by this process, and an ingress
//! proxy receiving `GET /hello/` at a steady rate from this process, every request timed and
//! classed (200 "Hello, world" is a success; else a connection error, a status, a wrong body, a
//! broken connection or no answer within 5 s).
//!
//! Then, per row, one target gets one fault: the helloworldserver of the busiest instance, that
//! instance's sidecar (its proxy), the allocator, an hl-service, the ping-monitor, or the `etcd`
//! member an hl-service supervises; the fault is SIGKILL (a daemon is started again at once with
//! the same flags, key and data directory; an instance, its sidecar and an etcd member are not
//! restarted by the benchmark: the allocator, or the hl-service, is to deal with them) or
//! SIGSTOP for a while, then SIGCONT. The row's window runs from the signal until requests have
//! all succeeded for `--settle`; in it are counted the requests sent, those that failed (by
//! class) and when requests succeeded again (the first success after the last failure, from the
//! signal). Then what was left behind, and whether the restarted (or resumed) daemon took up its
//! state, are read; then the starting state is brought back (every daemon running, two
//! instances, the ingress using both, requests all succeeding) before the next row.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use control::{
    allocator::protocol::{NAMESPACE as ALLOCATORS, StartProtocol, StartRequest, StartResponse},
    lookup::{
        ServiceRecord,
        protocol::{LookupProtocol, LookupRequest, LookupResponse, NAMESPACE as LOOKUPS},
    },
    overlay::Node,
};
use http::{StatusCode, Uri};
use http_body_util::BodyExt;
use libp2p::identity::Keypair;
use tempfile::TempDir;
use tokio::{sync::Semaphore, time::MissedTickBehavior};

use crate::{
    load::{self, GetClient},
    procs::{Daemon, Extra, alive, children, run_output, sibling_binary, spawn_daemon, stat},
    proxy_path::{StartedProxy, start_proxy_with},
    report::{Report, outln},
    scrape::{HttpError, http_text, scrape, value},
    stats::{ms, percentile},
};

/// The service the instances run.
const SERVICE: &str = "hello";
/// The allocator's ports (no other scenario uses them).
const PORT_RANGE: &str = "24000-24999";
/// Instances kept running: "a second instance exists".
const INSTANCES: usize = 2;
/// A request of the load not answered within this is a failure ("timeout").
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Most requests of the load in flight at once (a request waiting for a slot counts its wait
/// in its timeout).
const MAX_IN_FLIGHT: usize = 128;
/// The load never runs longer than this, whatever happens to the rows.
const MAX_LOAD: Duration = Duration::from_secs(20 * 60);
/// How often conditions are polled.
const POLL: Duration = Duration::from_millis(200);
/// How long a daemon may take to print its addresses.
const START_WITHIN: Duration = Duration::from_secs(30);
/// How long a program run to completion (hl-cli, etcdctl) may take.
const COMMAND_WITHIN: Duration = Duration::from_secs(20);

/// What gets the fault.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Target {
    /// The helloworldserver process of the busiest instance.
    Instance,
    /// The sidecar (proxy process) of the busiest instance.
    Sidecar,
    /// The allocator.
    Allocator,
    /// An hl-service (the second, which joined the etcd cluster; the only one without etcd).
    HlService,
    /// The ping-monitor, the overlay's only bootstrap.
    Monitor,
    /// The etcd member of an hl-service (the third).
    Etcd,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Self::Instance => "instance (helloworldserver)",
            Self::Sidecar => "its sidecar (proxy)",
            Self::Allocator => "allocator",
            Self::HlService => "hl-service",
            Self::Monitor => "ping-monitor (bootstrap)",
            Self::Etcd => "etcd member",
        }
    }
}

/// The fault.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Fault {
    /// SIGKILL, then a daemon is started again at once.
    Kill,
    /// SIGSTOP for `--stop`, then SIGCONT.
    Stop,
}

#[derive(clap::Args)]
pub struct Args {
    /// What gets a fault, in this order, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',',
          default_values = ["instance", "sidecar", "allocator", "hl-service", "monitor", "etcd"])]
    targets: Vec<Target>,
    /// The faults each target gets, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["kill", "stop"])]
    faults: Vec<Fault>,
    /// Requests a second through the ingress, all along.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// How long a SIGSTOP lasts before SIGCONT.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    stop: Duration,
    /// Requests must all succeed for this long for the system to count as recovered.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Every wait (recovery, the starting state brought back) gives up after this, and says so
    /// in the row.
    #[arg(long, default_value = "45s", value_parser = humantime::parse_duration)]
    deadline: Duration,
    /// What is still wrong this long after the window is a leftover.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    leftover_grace: Duration,
    /// Lookup services: 1 with the embedded record store, more sharing an etcd cluster.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    lookup_services: u32,
    /// The quick sizes (`bench all --quick` uses them; every other flag is then ignored):
    /// one lookup service with the embedded store, only the instance and the allocator,
    /// SIGSTOP for 2 s, shorter waits.
    #[arg(long)]
    quick: bool,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            targets: vec![
                Target::Instance,
                Target::Sidecar,
                Target::Allocator,
                Target::HlService,
                Target::Monitor,
                Target::Etcd,
            ],
            faults: vec![Fault::Kill, Fault::Stop],
            rate: 200,
            stop: Duration::from_secs(10),
            settle: Duration::from_secs(3),
            deadline: Duration::from_secs(45),
            leftover_grace: Duration::from_secs(10),
            lookup_services: 3,
            quick: false,
        }
    }
}

impl Args {
    /// The instance and the allocator only, SIGKILL (the allocator restarted) and SIGSTOP for
    /// 2 s, one lookup service with the embedded store (no etcd cluster to form), short waits:
    /// under a minute.
    pub fn quick() -> Self {
        Self {
            targets: vec![Target::Instance, Target::Allocator],
            faults: vec![Fault::Kill, Fault::Stop],
            rate: 200,
            stop: Duration::from_secs(2),
            settle: Duration::from_secs(2),
            deadline: Duration::from_secs(20),
            leftover_grace: Duration::from_secs(5),
            lookup_services: 1,
            quick: true,
        }
    }
}

pub async fn run(args: Args, out: &mut Report) -> anyhow::Result<()> {
    let args = if args.quick { Args::quick() } else { args };
    let command = out.command("faults");
    let began = Instant::now();
    let mut system = System::start(&args).await?;
    let mut rows = Vec::new();
    let outcome = system.rows(&args, &mut rows).await;
    let survivors = system.shut_down().await;
    let took = began.elapsed();
    report(out, &command, &args, &rows, &survivors, took);
    outcome
}

/// The cells of one row of the table, and what else it found.
struct Row {
    target: Target,
    fault: Fault,
    requests: String,
    failed: String,
    recovery: String,
    leftovers: String,
    state: String,
    notes: Vec<String>,
}

impl Row {
    fn new(target: Target, fault: Fault) -> Self {
        Self {
            target,
            fault,
            requests: "-".into(),
            failed: "-".into(),
            recovery: "-".into(),
            leftovers: "-".into(),
            state: "-".into(),
            notes: Vec::new(),
        }
    }

    /// A row measuring nothing, saying why.
    fn not_measured(target: Target, fault: Fault, why: &str) -> Self {
        let mut row = Self::new(target, fault);
        row.requests = format!("not measured: {why}");
        row
    }
}

fn report(
    out: &mut Report,
    command: &str,
    args: &Args,
    rows: &[Row],
    survivors: &[String],
    took: Duration,
) {
    let secs = |d: Duration| humantime::format_duration(d).to_string();
    let lookups = if args.lookup_services == 1 {
        "one hl-service with the embedded record store".to_owned()
    } else {
        format!(
            "{} hl-services sharing an etcd cluster (the first creates it, the others join \
             through the overlay; each supervises its `etcd` member)",
            args.lookup_services
        )
    };
    outln!(
        out,
        "## Faults: SIGKILL and SIGSTOP under a steady load\n\n`{command}`\n\n\
         Processes on loopback: a ping-monitor (the only bootstrap, with a key file and a fixed \
         port, so that a restart is the same bootstrap), {lookups}, `{SERVICE}` \
         (helloworldserver) registered with hl-cli, one allocator (process runtime, key file \
         and data directory kept across restarts, checks every 200 ms, no reuse window, no \
         idle culling), {INSTANCES} instances asked of it by the benchmark, and one ingress \
         proxy receiving `GET /{SERVICE}/` at {} requests/s from the benchmark all along (a \
         request fails unless answered 200 \"Hello, world\" within {}). Per row one target \
         gets one fault: SIGKILL, after which a daemon (allocator, hl-service, ping-monitor) \
         is started again at once with the same flags (an instance, a sidecar or an etcd \
         member is not: the allocator's checks, or the hl-service, are to deal with it), or \
         SIGSTOP for {}, then SIGCONT. The instance and sidecar faults hit the instance whose \
         sidecar served the most requests in the second before.\n\n\
         *requests*: sent from the signal until requests had all succeeded for {} (the \
         window); *failed*: those of them that failed, by class; *recovery*: from the signal \
         to the first success after the last failure; *leftovers*: what was still wrong {} \
         after the window: instance processes (`pgrep -f <allocator data dir>/instances/`) \
         the allocator does not list (its /targets and `allocator_instances`), instances it \
         lists that are gone, instance directories of neither, files in `blobs/tmp/` of every \
         hl-service and of the allocator, records other than `{SERVICE}` in `hl-cli list`, \
         etcd members beyond the lookup services or not started, etcd processes whose \
         hl-service is gone, and processes of a killed daemon still alive; *state picked \
         up*: whether the daemon restarted (or resumed) took up its state: the allocator \
         lists exactly the instances still running, an hl-service answers `get {SERVICE}` \
         (its etcd member runs again), after the ping-monitor a fresh `hl-cli get {SERVICE}` \
         through the bootstrap resolves. Between rows the starting state is brought back: \
         every daemon running (an etcd member by restarting its hl-service), exactly \
         {INSTANCES} instances (more asked of the allocator, or extra ones, which the ingress \
         may have asked for itself, stopped with SIGTERM to their sidecar as the allocator \
         culls), the ingress using them, requests all succeeding for {}. The notes under the \
         table say what that took, which instance was hit, the latency of the window's \
         successes and what the ingress counted meanwhile (`proxy_retries_total`, \
         `proxy_allocations_total`).\n",
        args.rate,
        secs(REQUEST_TIMEOUT),
        secs(args.stop),
        secs(args.settle),
        secs(args.leftover_grace),
        secs(args.settle),
    );
    if args.quick {
        outln!(
            out,
            "Quick sizes: only the instance and the allocator (SIGKILL, the allocator \
             restarted, and a 2 s SIGSTOP), one hl-service with the embedded store, shorter \
             waits; the other rows are not run.\n"
        );
    }
    outln!(
        out,
        "| target | fault | requests | failed | recovery | leftovers | state picked up |"
    );
    outln!(out, "|---|---|---|---|---|---|---|");
    for row in rows {
        let fault = match row.fault {
            Fault::Kill => "SIGKILL + restart".to_owned(),
            Fault::Stop => format!("SIGSTOP {}", secs(args.stop)),
        };
        let fault = match (row.fault, row.target) {
            (Fault::Kill, Target::Instance | Target::Sidecar | Target::Etcd) => {
                "SIGKILL".to_owned()
            }
            _ => fault,
        };
        outln!(
            out,
            "| {} | {fault} | {} | {} | {} | {} | {} |",
            row.target.name(),
            row.requests,
            row.failed,
            row.recovery,
            row.leftovers,
            row.state
        );
    }
    outln!(out);
    let notes: Vec<String> = rows
        .iter()
        .flat_map(|row| {
            row.notes
                .iter()
                .map(move |note| format!("- {} / {:?}: {note}", row.target.name(), row.fault))
        })
        .collect();
    if !notes.is_empty() {
        outln!(out, "Notes:\n");
        for note in notes {
            outln!(out, "{note}");
        }
        outln!(out);
    }
    if survivors.is_empty() {
        outln!(
            out,
            "After the run (every daemon stopped with SIGTERM, the allocator stopping its \
             instances), no process of it was left. The run took {:.0} s.\n",
            took.as_secs_f64()
        );
    } else {
        outln!(
            out,
            "After the run (every daemon stopped with SIGTERM), {} processes of it were still \
             there (then killed): {}. The run took {:.0} s.\n",
            survivors.len(),
            survivors.join("; "),
            took.as_secs_f64()
        );
    }
}

// ---------------------------------------------------------------------------------------
// The load.

/// How one request of the load ended.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Outcome {
    /// 200 "Hello, world".
    Ok,
    /// The ingress could not be connected to.
    Connect,
    /// Answered with another status.
    Status(u16),
    /// 200 with another body.
    Body,
    /// The connection broke (sending, or reading the answer).
    Broken,
    /// No answer within [`REQUEST_TIMEOUT`].
    Timeout,
}

impl Outcome {
    fn class(self) -> String {
        match self {
            Self::Ok => "ok".into(),
            Self::Connect => "connect error".into(),
            Self::Status(code) => format!("{code}"),
            Self::Body => "wrong body".into(),
            Self::Broken => "connection broken".into(),
            Self::Timeout => "timeout".into(),
        }
    }
}

/// One request: when it was sent, and how it ended (`None` while in flight).
#[derive(Clone, Copy)]
struct Sample {
    sent: Instant,
    outcome: Option<Outcome>,
    /// From its send to its end.
    took: Duration,
}

type Samples = Arc<Mutex<Vec<Sample>>>;

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// GETs through the ingress at a steady rate, from [`Load::start`] until [`Load::finish`] (or
/// [`MAX_LOAD`]), each recorded.
struct Load {
    samples: Samples,
    stop: Arc<AtomicBool>,
    pacer: tokio::task::JoinHandle<()>,
    rate: u32,
}

/// One GET of the load.
async fn get_hello(client: &GetClient, uri: Uri) -> Outcome {
    let response = match client.get(uri).await {
        Ok(response) => response,
        Err(e) if e.is_connect() => return Outcome::Connect,
        Err(_) => return Outcome::Broken,
    };
    let status = response.status();
    let Ok(body) = response.into_body().collect().await else {
        return Outcome::Broken;
    };
    if status != StatusCode::OK {
        return Outcome::Status(status.as_u16());
    }
    if String::from_utf8_lossy(&body.to_bytes()).contains("Hello, world") {
        Outcome::Ok
    } else {
        Outcome::Body
    }
}

impl Load {
    fn start(client: &GetClient, ingress: SocketAddr, rate: u32) -> anyhow::Result<Self> {
        let uri: Uri = format!("http://{ingress}/{SERVICE}/").parse()?;
        let samples: Samples = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let limit = u64::from(rate) * MAX_LOAD.as_secs();
        let (client, recorded, stopped) = (client.clone(), Arc::clone(&samples), Arc::clone(&stop));
        let pacer = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
            every.set_missed_tick_behavior(MissedTickBehavior::Burst);
            for _ in 0..limit {
                every.tick().await;
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                let index = {
                    let mut samples = locked(&recorded);
                    samples.push(Sample {
                        sent: Instant::now(),
                        outcome: None,
                        took: Duration::ZERO,
                    });
                    samples.len() - 1
                };
                let (client, uri, slots, recorded) = (
                    client.clone(),
                    uri.clone(),
                    Arc::clone(&slots),
                    Arc::clone(&recorded),
                );
                tokio::spawn(async move {
                    let answered = tokio::time::timeout(REQUEST_TIMEOUT, async {
                        let Ok(_slot) = slots.acquire_owned().await else {
                            return Outcome::Broken;
                        };
                        get_hello(&client, uri).await
                    })
                    .await;
                    let mut samples = locked(&recorded);
                    let sample = &mut samples[index];
                    sample.outcome = Some(answered.unwrap_or(Outcome::Timeout));
                    sample.took = sample.sent.elapsed();
                });
            }
        });
        Ok(Self {
            samples,
            stop,
            pacer,
            rate,
        })
    }

    /// The samples sent in `[from, to)`.
    fn window(&self, from: Instant, to: Instant) -> Vec<Sample> {
        let samples = locked(&self.samples);
        let start = samples.partition_point(|s| s.sent < from);
        let end = samples.partition_point(|s| s.sent < to);
        samples[start..end].to_vec()
    }

    /// Whether every request sent in the `settle` before `now` (less half a second for the
    /// answers) succeeded, and enough were sent.
    fn steady(&self, settle: Duration, now: Instant) -> bool {
        let lag = Duration::from_millis(500);
        let (Some(to), Some(from)) = (now.checked_sub(lag), now.checked_sub(lag + settle)) else {
            return false;
        };
        let window = self.window(from, to);
        let expected = settle.as_secs_f64() * f64::from(self.rate);
        window.len() as f64 >= expected / 2.0
            && window.iter().all(|s| s.outcome == Some(Outcome::Ok))
    }

    /// Until requests have all succeeded for `settle`, counting only requests sent after
    /// `after`: the moment that held, or the deadline's moment if it never did.
    async fn wait_steady(
        &self,
        after: Instant,
        settle: Duration,
        deadline: Duration,
    ) -> Result<Instant, Instant> {
        let give_up = after + deadline;
        loop {
            let now = Instant::now();
            let since = now.saturating_duration_since(after);
            if since >= settle + Duration::from_millis(500) && self.steady(settle, now) {
                return Ok(now);
            }
            if now >= give_up {
                return Err(now);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The samples sent in `[from, to)`, once each has ended (or the request timeout passed).
    async fn settled(&self, from: Instant, to: Instant) -> Vec<Sample> {
        let give_up = Instant::now() + REQUEST_TIMEOUT + Duration::from_secs(1);
        loop {
            let window = self.window(from, to);
            if window.iter().all(|s| s.outcome.is_some()) || Instant::now() >= give_up {
                return window;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stops sending and waits for the requests in flight.
    async fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = (&mut self.pacer).await;
        let now = Instant::now();
        let start = now - Duration::from_secs(1);
        let _ = self.settled(start, now).await;
    }
}

impl Drop for Load {
    /// Never outlives the run, even when it ends in an error.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.pacer.abort();
    }
}

/// What a window's requests did.
struct Tally {
    sent: usize,
    failed: BTreeMap<String, usize>,
    /// Still in flight when counted (after the request timeout: should be none).
    pending: usize,
    /// From the window's start to the first success after the last failure; `None` if none
    /// came.
    recovery: Option<Duration>,
}

impl Tally {
    fn of(samples: &[Sample], from: Instant) -> Self {
        let mut failed = BTreeMap::new();
        let mut pending = 0;
        let mut last_failure = None;
        for (i, sample) in samples.iter().enumerate() {
            match sample.outcome {
                None => pending += 1,
                Some(Outcome::Ok) => {}
                Some(outcome) => {
                    *failed.entry(outcome.class()).or_insert(0) += 1;
                    last_failure = Some(i);
                }
            }
        }
        let recovery = match last_failure {
            None => Some(Duration::ZERO),
            Some(i) => samples[i + 1..]
                .iter()
                .find(|s| s.outcome == Some(Outcome::Ok))
                .map(|s| s.sent.saturating_duration_since(from)),
        };
        Self {
            sent: samples.len(),
            failed,
            pending,
            recovery,
        }
    }

    fn failures(&self) -> usize {
        self.failed.values().sum()
    }

    /// "0", or "12 (8 × 503, 4 × timeout)".
    fn failed_cell(&self) -> String {
        let total = self.failures();
        if total == 0 {
            return "0".into();
        }
        let classes: Vec<String> = self
            .failed
            .iter()
            .map(|(class, n)| format!("{n} × {class}"))
            .collect();
        format!("{total} ({})", classes.join(", "))
    }
}

// ---------------------------------------------------------------------------------------
// Processes.

/// Sends `signal` to `pid`.
fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().to_owned())
        .unwrap_or_default()
}

/// Every live process but this one, with its command line (arguments joined by spaces).
fn processes() -> Vec<(u32, String)> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && alive(pid))
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            Some((pid, cmdline.trim().to_owned()))
        })
        .collect()
}

/// The live processes whose command line contains `needle` (as `pgrep -f` finds them).
fn processes_matching(needle: &str) -> Vec<(u32, String)> {
    processes()
        .into_iter()
        .filter(|(_, cmdline)| cmdline.contains(needle))
        .collect()
}

/// Kills, when dropped, every process whose command line names the run's directory: the
/// instances (in sessions of their own, they outlive the allocator by design) and the etcd
/// members, whatever went wrong.
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        for (pid, _) in processes_matching(&format!("{}/", self.0.display())) {
            signal(pid, libc::SIGKILL);
        }
    }
}

/// One of our daemons, started with fixed flags so that it can be killed and started again
/// as the same program (same key, data directory, ports).
struct Managed {
    /// The binary.
    program: &'static str,
    /// What the report calls it.
    label: String,
    args: Vec<String>,
    /// A line it prints once it serves (after its addresses), if any.
    ready: Option<&'static str>,
    running: Option<Daemon>,
}

impl Managed {
    fn new(program: &'static str, label: &str, args: Vec<String>) -> Self {
        Self {
            program,
            label: label.to_owned(),
            args,
            ready: None,
            running: None,
        }
    }

    /// Starts it and waits for its overlay and metrics addresses (and its ready line).
    async fn start(&mut self) -> anyhow::Result<()> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let program = sibling_binary(self.program)?;
        let started = spawn_daemon(&program, &args, self.ready, Extra::default());
        let daemon = tokio::time::timeout(START_WITHIN, started)
            .await
            .with_context(|| format!("{} did not start within {START_WITHIN:?}", self.label))?
            .with_context(|| format!("{} did not start", self.label))?;
        self.running = Some(daemon);
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.running.as_ref().map(|r| r.pid)
    }

    fn running(&self) -> Result<&Daemon, ProbeError> {
        self.running
            .as_ref()
            .ok_or_else(|| ProbeError::Daemon(format!("{} is not running", self.label)))
    }

    /// Whether it runs (it may have exited on its own).
    fn is_alive(&self) -> bool {
        self.pid().is_some_and(alive)
    }

    /// SIGKILL, and reaped.
    async fn kill(&mut self) {
        if let Some(running) = self.running.take() {
            signal(running.pid, libc::SIGKILL);
            running.terminate(Duration::from_secs(5)).await;
        }
    }

    /// SIGTERM, killed after `grace`.
    async fn terminate(&mut self, grace: Duration) {
        if let Some(running) = self.running.take() {
            running.terminate(grace).await;
        }
    }
}

/// Why a look at the system under test (a program run, an endpoint read, a daemon asked) gave
/// no answer; the report prints it in the row.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    /// A program did not exit, or the system did not come to a state, within its time.
    #[error("{what} within {within:?}")]
    TimedOut {
        /// What did not happen ("etcdctl did not exit", ...).
        what: String,
        /// The time it had.
        within: Duration,
    },
    /// A program could not be run, or exited with a failure: its message.
    #[error("{0}")]
    Failed(String),
    /// An endpoint of a daemon (/metrics, /targets) could not be read.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// A daemon of the system is not running, or could not be started again.
    #[error("{0}")]
    Daemon(String),
    /// A daemon answered, otherwise than the starting state has it.
    #[error("{0}")]
    Answer(String),
}

/// A fault's target with no process to signal.
fn not_running() -> ProbeError {
    ProbeError::Daemon("not running".into())
}

/// Runs `program` (from PATH or a path) to completion within [`COMMAND_WITHIN`]: its standard
/// output, or why not.
async fn command_output(
    program: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<String, ProbeError> {
    let run = tokio::process::Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .env_remove("P2P_BOOTSTRAPS")
        .env_remove("P2P_PSK")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(COMMAND_WITHIN, run)
        .await
        .map_err(|_| ProbeError::TimedOut {
            what: format!("{program} did not exit"),
            within: COMMAND_WITHIN,
        })?
        .map_err(|e| ProbeError::Failed(format!("cannot run {program}: {e}")))?;
    if !output.status.success() {
        return Err(ProbeError::Failed(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// [`run_output`] of one of our binaries within [`COMMAND_WITHIN`]; its error is the last line
/// of its standard error (its message, after any log lines).
async fn ours(name: &str, args: &[&str]) -> Result<String, ProbeError> {
    tokio::time::timeout(COMMAND_WITHIN, run_output(name, args))
        .await
        .map_err(|_| ProbeError::TimedOut {
            what: format!("{name} did not exit"),
            within: COMMAND_WITHIN,
        })?
        .map_err(|e| {
            let text = format!("{e:#}");
            ProbeError::Failed(short(text.lines().last().unwrap_or_default()))
        })
}

/// At most a table cell's worth of `text`: its terminal colours, line breaks and pipes
/// removed, cut with an ellipsis.
fn short(text: &str) -> String {
    const MOST: usize = 160;
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // An escape sequence, to its final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else if c != '\n' && c != '|' {
            plain.push(c);
        }
    }
    if plain.chars().count() > MOST {
        let cut: String = plain.chars().take(MOST).collect();
        format!("{cut}…")
    } else {
        plain
    }
}

// ---------------------------------------------------------------------------------------
// The system under test.

/// One instance the allocator lists.
#[derive(Clone, Debug)]
struct Instance {
    id: String,
    /// Its sidecar's /metrics.
    metrics: SocketAddr,
    /// Its sidecar (the proxy the allocator started), from `instance.json`.
    sidecar: Option<u32>,
}

/// Every process of the run, killed when dropped (the fields drop in order: the processes,
/// then the reaper, then the directory).
struct System {
    monitor: Managed,
    lookups: Vec<Managed>,
    /// Each lookup service's etcd client URL, when they share a cluster.
    etcd: Vec<String>,
    allocator: Managed,
    ingress: Option<StartedProxy>,
    node: Node,
    client: GetClient,
    record: ServiceRecord,
    load: Option<Load>,
    /// Held for its drop, after every process above.
    _reaper: Reaper,
    dir: TempDir,
}

impl System {
    fn bootstrap(&self) -> String {
        self.monitor
            .running
            .as_ref()
            .map(|r| r.bootstrap.to_string())
            .unwrap_or_default()
    }

    fn allocator_data(&self) -> PathBuf {
        self.dir.path().join("allocator")
    }

    fn instances_dir(&self) -> PathBuf {
        self.allocator_data().join("instances")
    }

    async fn start(args: &Args) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let reaper = Reaper(dir.path().to_owned());
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let monitor_port = testkit::free_port();
        let mut monitor = Managed::new(
            "ping-monitor",
            "ping-monitor",
            vec![
                "--keyfile".into(),
                path(&dir.path().join("monitor.key")),
                "--p2p-listen-addr".into(),
                format!("127.0.0.1:{monitor_port}"),
                "--prom-listen-addr".into(),
                "127.0.0.1:0".into(),
            ],
        );
        monitor.start().await?;
        let bootstrap = monitor.running()?.bootstrap.to_string();
        eprintln!("faults: ping-monitor at {bootstrap}");

        let n = args.lookup_services as usize;
        let ports = if n > 1 {
            testkit::free_ports(2 * n)
        } else {
            Vec::new()
        };
        let mut lookups = Vec::new();
        let mut etcd = Vec::new();
        for i in 0..n {
            let data = dir.path().join(format!("lookup-{i}"));
            let mut flags = vec![
                "--bootstrap".to_owned(),
                bootstrap.clone(),
                "--data-dir".into(),
                path(&data),
                "--keyfile".into(),
                path(&dir.path().join(format!("lookup-{i}.key"))),
                "--p2p-listen-addr".into(),
                "127.0.0.1:0".into(),
                "--prom-listen-addr".into(),
                "127.0.0.1:0".into(),
            ];
            if n > 1 {
                let (client, peer) = (ports[2 * i], ports[2 * i + 1]);
                flags.extend([
                    "--etcd-ip".into(),
                    "127.0.0.1".into(),
                    "--etcd-client-port".into(),
                    client.to_string(),
                    "--etcd-peer-port".into(),
                    peer.to_string(),
                ]);
                if i == 0 {
                    flags.push("--new-etcd-cluster".into());
                }
                etcd.push(format!("http://127.0.0.1:{client}"));
            }
            let mut lookup = Managed::new("hl-service", &format!("hl-service {}", i + 1), flags);
            lookup.start().await?;
            if n > 1 {
                wait_members(&etcd[0], i + 1, Duration::from_secs(90)).await?;
            }
            lookups.push(lookup);
        }
        eprintln!("faults: {n} hl-services");

        let hello = sibling_binary("helloworldserver")?;
        let added = ours(
            "hl-cli",
            &[
                "--bootstrap",
                &bootstrap,
                "add",
                "--exec",
                hello.to_str().context("path")?,
                SERVICE,
                "--",
                "helloworldserver",
                "$SERVICE_PORT",
            ],
        )
        .await?;
        eprintln!("faults: {}", added.lines().next().unwrap_or_default());
        let json = ours(
            "hl-cli",
            &["--bootstrap", &bootstrap, "--json", "get", SERVICE],
        )
        .await?;
        let record = ServiceRecord::from_json(json.as_bytes()).map_err(anyhow::Error::msg)?;

        let data = dir.path().join("allocator");
        let proxy = sibling_binary("proxy")?;
        let mut allocator = Managed::new(
            "allocator",
            "allocator",
            [
                "--bootstrap",
                &bootstrap,
                "--runtime",
                "process",
                "--host-ip",
                "127.0.0.1",
                "--proxy-binary",
                &path(&proxy),
                "--data-dir",
                &path(&data),
                "--keyfile",
                &path(&dir.path().join("allocator.key")),
                "--check-interval",
                "200ms",
                "--reuse-window",
                "0s",
                "--idle-timeout",
                "24h",
                "--boot-grace",
                "2s",
                "--port-range",
                PORT_RANGE,
                "--p2p-listen-addr",
                "127.0.0.1:0",
                "--prom-listen-addr",
                "127.0.0.1:0",
            ]
            .iter()
            .map(|a| (*a).to_owned())
            .collect(),
        );
        allocator.ready = Some("runtime: ");
        allocator.start().await?;

        let monitor_addr = monitor.running()?.bootstrap.clone();
        let node = Node::start(testkit::node_config(
            "bench",
            Keypair::generate_ed25519(),
            std::slice::from_ref(&monitor_addr),
        ))
        .await?;
        let ingress = start_proxy_with(&bootstrap, &[], &[], Extra::default()).await?;
        let client: GetClient = load::client();
        let mut system = Self {
            monitor,
            lookups,
            etcd,
            allocator,
            ingress: Some(ingress),
            node,
            client,
            record,
            load: None,
            _reaper: reaper,
            dir,
        };
        // The ingress must first resolve the record and find the instances; requests before
        // the load starts are not counted.
        system
            .restore(args, None, &mut Vec::new())
            .await
            .map_err(|why| anyhow::anyhow!("the starting state was not reached: {why}"))?;
        let ingress = system.ingress.as_ref().context("ingress")?.ingress;
        system.load = Some(Load::start(&system.client, ingress, args.rate)?);
        eprintln!("faults: load started at {} requests/s", args.rate);
        Ok(system)
    }

    /// Every row, each after the starting state is back.
    async fn rows(&mut self, args: &Args, rows: &mut Vec<Row>) -> anyhow::Result<()> {
        let mut since = Instant::now();
        for &target in &args.targets {
            for &fault in &args.faults {
                let name = format!("{} / {fault:?}", target.name());
                eprintln!("faults: {name}: bringing back the starting state");
                let counters = self.ingress_counters().await;
                let mut done = Vec::new();
                let restored = self.restore(args, Some(since), &mut done).await;
                if !done.is_empty() {
                    eprintln!("faults: {name}: {}", done.join("; "));
                }
                if let Err(why) = restored {
                    eprintln!("faults: {name}: not measured: {why}");
                    rows.push(Row::not_measured(
                        target,
                        fault,
                        &format!("the starting state was not brought back: {why}"),
                    ));
                    since = Instant::now();
                    continue;
                }
                let mut row = Row::new(target, fault);
                if !done.is_empty() {
                    row.notes
                        .push(format!("before the fault: {}", done.join("; ")));
                }
                // Failures while the starting state came back, before this row's fault.
                let before = Instant::now();
                let gap = self.load()?.settled(since, before).await;
                let gap = Tally::of(&gap, since);
                if gap.failures() > 0 {
                    row.notes.push(format!(
                        "before the fault, while the starting state came back: {} of {} \
                         requests failed",
                        gap.failed_cell(),
                        gap.sent
                    ));
                }
                let changed = counters_changed(&counters, &self.ingress_counters().await);
                if !changed.is_empty() {
                    row.notes.push(format!(
                        "the ingress while the starting state came back: {changed}"
                    ));
                }
                if let Ok(listed) = self.listed().await {
                    row.notes.push(format!(
                        "{} instances at the fault: {}",
                        listed.len(),
                        listed
                            .iter()
                            .map(|i| i.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                eprintln!("faults: {name}");
                since = self.fault(args, target, fault, &mut row).await;
                eprintln!(
                    "faults: {name}: {} sent, failed {}, recovery {}, leftovers {}, state {}",
                    row.requests, row.failed, row.recovery, row.leftovers, row.state
                );
                rows.push(row);
            }
        }
        Ok(())
    }

    fn load(&self) -> anyhow::Result<&Load> {
        self.load.as_ref().context("the load is not running")
    }

    /// The lookup service an `hl-service` fault hits: the second (it joined the cluster), or
    /// the only one.
    fn lookup_target(&self) -> usize {
        1.min(self.lookups.len() - 1)
    }

    /// The lookup service whose etcd member an `etcd` fault hits: the third (or the last).
    fn etcd_target(&self) -> usize {
        2.min(self.lookups.len() - 1)
    }

    /// One fault and what followed; returns when the row's window ended.
    async fn fault(&mut self, args: &Args, target: Target, fault: Fault, row: &mut Row) -> Instant {
        let mut victim_instance = None;
        // The victim, and what is to be started again after SIGKILL.
        let victim: Result<u32, ProbeError> = match target {
            Target::Instance | Target::Sidecar => match self.busiest().await {
                Err(why) => Err(why),
                Ok((instance, served, of)) => {
                    row.notes.push(format!(
                        "the instance hit: {} (its sidecar served {served} of the {of} requests \
                         of the second before)",
                        instance.id
                    ));
                    victim_instance = Some(instance.id.clone());
                    let sidecar = instance.sidecar.ok_or_else(|| {
                        ProbeError::Daemon(format!("no process of instance {}", instance.id))
                    });
                    match target {
                        Target::Sidecar => sidecar,
                        _ => sidecar.and_then(|pid| {
                            children(pid).into_iter().next().ok_or_else(|| {
                                ProbeError::Daemon(format!(
                                    "no service process under sidecar {pid}"
                                ))
                            })
                        }),
                    }
                }
            },
            Target::Allocator => self.allocator.pid().ok_or_else(not_running),
            Target::HlService => self.lookups[self.lookup_target()]
                .pid()
                .ok_or_else(not_running),
            Target::Monitor => self.monitor.pid().ok_or_else(not_running),
            Target::Etcd if self.etcd.is_empty() => Err(ProbeError::Daemon(
                "one lookup service with the embedded store: no etcd".into(),
            )),
            Target::Etcd => self.etcd_member(self.etcd_target()).ok_or_else(|| {
                ProbeError::Daemon(format!(
                    "{} has no etcd child",
                    self.lookups[self.etcd_target()].label
                ))
            }),
        };
        let victim = match victim {
            Ok(pid) => pid,
            Err(why) => {
                let notes = std::mem::take(&mut row.notes);
                *row = Row::not_measured(target, fault, &why.to_string());
                row.notes = notes;
                return Instant::now();
            }
        };
        let ingress_before = self.ingress_counters().await;
        let fault_at = Instant::now();
        match fault {
            Fault::Kill => {
                let restarted = match target {
                    Target::Allocator => Some(&mut self.allocator),
                    Target::HlService => {
                        let i = self.lookup_target();
                        Some(&mut self.lookups[i])
                    }
                    Target::Monitor => Some(&mut self.monitor),
                    _ => None,
                };
                match restarted {
                    Some(daemon) => {
                        daemon.kill().await;
                        if let Err(why) = daemon.start().await {
                            row.notes.push(format!("the restart failed: {why:#}"));
                        }
                    }
                    None => signal(victim, libc::SIGKILL),
                }
            }
            Fault::Stop => {
                signal(victim, libc::SIGSTOP);
                tokio::time::sleep(args.stop).await;
                signal(victim, libc::SIGCONT);
            }
        }
        let acted = Instant::now();
        let Ok(load) = self.load() else {
            return Instant::now();
        };
        let (end, recovered) = match load.wait_steady(acted, args.settle, args.deadline).await {
            Ok(end) => (end, true),
            Err(end) => (end, false),
        };
        let window = load.settled(fault_at, end).await;
        let tally = Tally::of(&window, fault_at);
        row.requests = format!(
            "{} in {:.1} s",
            tally.sent,
            end.duration_since(fault_at).as_secs_f64()
        );
        row.failed = tally.failed_cell();
        row.recovery = match (tally.failures(), tally.recovery, recovered) {
            (0, _, true) => "0 (none failed)".into(),
            (_, Some(after), true) => format!("{:.2} s", after.as_secs_f64()),
            (_, Some(after), false) => format!(
                "{:.2} s, but not all succeeding for {} within {}",
                after.as_secs_f64(),
                humantime::format_duration(args.settle),
                humantime::format_duration(args.deadline)
            ),
            (_, None, _) => format!(
                "not recovered within {}",
                humantime::format_duration(args.deadline)
            ),
        };
        let mut took: Vec<Duration> = window
            .iter()
            .filter(|s| s.outcome == Some(Outcome::Ok))
            .map(|s| s.took)
            .collect();
        if !took.is_empty() {
            let mut at = |p| ms(percentile(&mut took, p));
            row.notes.push(format!(
                "latency of the window's successes: p50 {} ms, p99 {} ms, max {} ms",
                at(50.0),
                at(99.0),
                at(100.0)
            ));
        }
        if tally.pending > 0 {
            row.notes.push(format!(
                "{} requests of the window had no outcome when counted",
                tally.pending
            ));
        }

        // What is left behind: what is still wrong after the grace.
        let give_up = Instant::now() + args.leftover_grace;
        let killed = (fault == Fault::Kill).then_some(victim);
        let mut left = self.leftovers(killed).await;
        while !left.is_empty() && Instant::now() < give_up {
            tokio::time::sleep(POLL * 2).await;
            left = self.leftovers(killed).await;
        }
        row.leftovers = if left.is_empty() {
            "none".into()
        } else {
            left.join("; ")
        };
        row.state = self
            .state_picked_up(target, fault, victim_instance.as_deref())
            .await;
        // What the ingress did about it.
        let changed = counters_changed(&ingress_before, &self.ingress_counters().await);
        if !changed.is_empty() {
            row.notes
                .push(format!("the ingress in the window and after: {changed}"));
        }
        end
    }

    /// Whether the daemon restarted (or resumed) took up its state.
    async fn state_picked_up(
        &self,
        target: Target,
        fault: Fault,
        instance: Option<&str>,
    ) -> String {
        match target {
            Target::Instance | Target::Sidecar => {
                let listed = self.listed().await;
                let running = self.instance_processes();
                let kept = |listed: &[Instance]| {
                    instance.is_some_and(|id| {
                        listed.iter().any(|i| i.id == id) && running.contains_key(id)
                    })
                };
                match (fault, listed) {
                    (_, Err(why)) => format!("n.a.; the allocator's list: {why}"),
                    (Fault::Kill, Ok(listed)) => format!(
                        "n.a. (not restarted); the allocator lists {} instances, {} run",
                        listed.len(),
                        running.len()
                    ),
                    (Fault::Stop, Ok(listed)) if kept(&listed) => format!(
                        "n.a.: resumed, still listed; the allocator lists {} instances, {} run",
                        listed.len(),
                        running.len()
                    ),
                    (Fault::Stop, Ok(listed)) => format!(
                        "n.a.: culled by the allocator while stopped; it lists {} instances, \
                         {} run",
                        listed.len(),
                        running.len()
                    ),
                }
            }
            Target::Allocator => {
                let running = self.instance_processes().len();
                match (self.listed().await, self.allocator_metric().await) {
                    (Ok(listed), Ok(metric)) if listed.len() == running && metric == running => {
                        format!("yes: lists {running} of {running} running instances")
                    }
                    (Ok(listed), Ok(metric)) => format!(
                        "no: lists {} (allocator_instances {metric}) of {running} running",
                        listed.len()
                    ),
                    (Err(why), _) | (_, Err(why)) => format!("no: {why}"),
                }
            }
            Target::HlService => {
                let i = self.lookup_target();
                let mut answer = self.lookup_answers(i).await;
                if answer.is_ok() && !self.etcd.is_empty() && self.etcd_member(i).is_none() {
                    answer = Err(ProbeError::Daemon("its etcd member is not running".into()));
                }
                match answer {
                    Ok(()) => format!("yes: answers `get {SERVICE}`"),
                    Err(why) => format!("no: {why}"),
                }
            }
            Target::Monitor => {
                let bootstrap = self.bootstrap();
                match ours("hl-cli", &["--bootstrap", &bootstrap, "get", SERVICE]).await {
                    Ok(_) => format!("yes: a fresh `hl-cli get {SERVICE}` resolves"),
                    Err(why) => format!("no: {why}"),
                }
            }
            Target::Etcd => {
                let i = self.etcd_target();
                let member = self.etcd_member(i);
                let answer = self.lookup_answers(i).await;
                let answer = match answer {
                    Ok(()) => format!("`get {SERVICE}` through it works"),
                    Err(why) => format!("`get {SERVICE}` through it fails: {why}"),
                };
                match (fault, member) {
                    (Fault::Kill, None) => format!(
                        "no: {} did not start its etcd member again; {answer}",
                        self.lookups[i].label
                    ),
                    (Fault::Kill, Some(_)) => {
                        format!("yes: {} started it again; {answer}", self.lookups[i].label)
                    }
                    (Fault::Stop, Some(_)) => format!("resumed; {answer}"),
                    (Fault::Stop, None) => format!("no: the member is gone; {answer}"),
                }
            }
        }
    }

    /// The etcd process lookup service `i` supervises.
    fn etcd_member(&self, i: usize) -> Option<u32> {
        let pid = self.lookups.get(i)?.pid()?;
        children(pid).into_iter().find(|&c| comm(c) == "etcd")
    }

    /// Whether lookup service `i` answers `get hello` with the record.
    async fn lookup_answers(&self, i: usize) -> Result<(), ProbeError> {
        let running = self.lookups[i].running()?;
        let peer = running.bootstrap.peer;
        // Found as clients find it (which dials its current address).
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            testkit::providers(&self.node, LOOKUPS),
        )
        .await;
        match self
            .node
            .request::<LookupProtocol>(peer, &LookupRequest::Get(SERVICE.into()))
            .await
        {
            Ok(LookupResponse::Found(_)) => Ok(()),
            Ok(other) => Err(ProbeError::Answer(short(&format!("answered {other:?}")))),
            Err(e) => Err(ProbeError::Failed(short(&e.to_string()))),
        }
    }

    /// The instances the allocator lists on /targets.
    async fn listed(&self) -> Result<Vec<Instance>, ProbeError> {
        let metrics = self.allocator.running()?.metrics;
        let text = http_text(&self.client, metrics, "/targets").await?;
        let groups: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ProbeError::Answer(format!("/targets: {e}")))?;
        let malformed = |what: &str| ProbeError::Answer(format!("/targets: {what}"));
        let mut instances = Vec::new();
        for group in groups.as_array().into_iter().flatten() {
            let id = group["labels"]["mtc_instance"]
                .as_str()
                .ok_or_else(|| malformed("a target with no mtc_instance"))?
                .to_owned();
            let metrics = group["targets"][0]
                .as_str()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| malformed("a target with no address"))?;
            let state = std::fs::read(self.instances_dir().join(&id).join("instance.json")).ok();
            let sidecar = state
                .and_then(|s| serde_json::from_slice::<serde_json::Value>(&s).ok())
                .and_then(|s| s["pid"].as_u64())
                .map(|pid| pid as u32)
                .filter(|&pid| alive(pid));
            instances.push(Instance {
                id,
                metrics,
                sidecar,
            });
        }
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(instances)
    }

    /// `allocator_instances{service="hello"}`.
    async fn allocator_metric(&self) -> Result<usize, ProbeError> {
        let metrics = self.allocator.running()?.metrics;
        let text = scrape(&self.client, metrics).await?;
        let series = format!("allocator_instances{{service=\"{SERVICE}\"}}");
        Ok(value(&text, &series).unwrap_or(0.0) as usize)
    }

    /// The live processes under the allocator's instance directory, by instance.
    fn instance_processes(&self) -> BTreeMap<String, Vec<u32>> {
        let prefix = format!("{}/", self.instances_dir().display());
        let mut by_instance: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for (pid, cmdline) in processes_matching(&prefix) {
            let Some(at) = cmdline.find(&prefix) else {
                continue;
            };
            let id = cmdline[at + prefix.len()..]
                .split(['/', ' '])
                .next()
                .unwrap_or_default()
                .to_owned();
            by_instance.entry(id).or_default().push(pid);
        }
        by_instance
    }

    /// The instance whose sidecar served the most requests in the last second, and how many
    /// of how many it served.
    async fn busiest(&self) -> Result<(Instance, u64, u64), ProbeError> {
        let instances = self.listed().await?;
        let served = |text: &str| value(text, "proxy_served_requests_total").unwrap_or(0.0);
        let mut before = Vec::new();
        for instance in &instances {
            before.push(
                scrape(&self.client, instance.metrics)
                    .await
                    .map(|t| served(&t)),
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut best: Option<(f64, &Instance)> = None;
        let mut total = 0.0;
        for (instance, before) in instances.iter().zip(before) {
            let Ok(before) = before else { continue };
            let Ok(after) = scrape(&self.client, instance.metrics).await else {
                continue;
            };
            let delta = served(&after) - before;
            total += delta;
            if best.is_none_or(|(most, _)| delta > most) {
                best = Some((delta, instance));
            }
        }
        best.map(|(most, instance)| (instance.clone(), most as u64, total as u64))
            .ok_or_else(|| ProbeError::Answer("no instance's sidecar answers".into()))
    }

    /// The peer ID of an instance's sidecar, from the line it printed to its log.
    fn sidecar_peer(&self, id: &str) -> Option<String> {
        let log = std::fs::read_to_string(self.instances_dir().join(id).join("log")).ok()?;
        log.lines().find_map(|line| {
            let head = line.strip_suffix(" listening on:")?;
            head.split_whitespace().nth(1).map(str::to_owned)
        })
    }

    /// Whether the ingress lists every one of `peers` as an instance of the service, neither
    /// ejected nor down.
    async fn ingress_uses(&self, peers: &[String]) -> bool {
        let Some(ingress) = &self.ingress else {
            return false;
        };
        let Ok(text) = scrape(&self.client, ingress.metrics).await else {
            return false;
        };
        peers.iter().all(|peer| {
            let label = format!("instance=\"{peer}\"");
            let series = |name: &str| {
                text.lines()
                    .find(|l| l.starts_with(name) && l.contains(&label))
                    .map(|l| l.trim_end().ends_with(" 0"))
            };
            series("proxy_instance_in_flight{").is_some()
                && series("proxy_instance_ejected{").unwrap_or(true)
                && series("proxy_instance_service_down{").unwrap_or(true)
        })
    }

    /// The ingress's retries and allocations so far, by outcome (and reason).
    async fn ingress_counters(&self) -> BTreeMap<String, f64> {
        let Some(ingress) = &self.ingress else {
            return BTreeMap::new();
        };
        let Ok(text) = scrape(&self.client, ingress.metrics).await else {
            return BTreeMap::new();
        };
        text.lines()
            .filter(|l| {
                l.starts_with("proxy_retries_total{") || l.starts_with("proxy_allocations_total{")
            })
            .filter_map(|line| {
                let (series, count) = line.rsplit_once(' ')?;
                let name = series
                    .trim_start_matches("proxy_")
                    .replace("_total", "")
                    .replace(&format!("service=\"{SERVICE}\""), "")
                    .replace("{,", "{")
                    .replace(",}", "}")
                    .replace(",,", ",")
                    .replace('"', "");
                Some((name, count.parse().ok()?))
            })
            .collect()
    }

    /// The ingress's per-instance series of the service, for an error message.
    async fn ingress_view(&self) -> String {
        let Some(ingress) = &self.ingress else {
            return "no ingress".into();
        };
        match scrape(&self.client, ingress.metrics).await {
            Ok(text) => {
                let lines: Vec<&str> = text
                    .lines()
                    .filter(|l| l.starts_with("proxy_instance_") && !l.contains("quantile"))
                    .collect();
                if lines.is_empty() {
                    "no instance".into()
                } else {
                    lines.join(", ")
                }
            }
            Err(why) => why.to_string(),
        }
    }

    /// Asks the allocator for one more instance.
    async fn ask_instance(&self) -> Result<String, ProbeError> {
        let allocator = self.allocator.running()?.bootstrap.peer;
        let request = StartRequest {
            service: SERVICE.into(),
            digest: self.record.digest.to_string(),
        };
        let mut last = ProbeError::Answer("not asked".into());
        for attempt in 0..3 {
            // Found as proxies find it (which dials its current address).
            let found = tokio::time::timeout(
                Duration::from_secs(10),
                testkit::providers(&self.node, ALLOCATORS),
            )
            .await
            .unwrap_or_default();
            if !found.contains(&allocator) {
                last = ProbeError::Answer("the allocator is not found on the overlay".into());
            } else {
                match self
                    .node
                    .request::<StartProtocol>(allocator, &request)
                    .await
                {
                    Ok(StartResponse::Started { instance, .. }) => return Ok(instance),
                    Ok(StartResponse::Refused(why)) => {
                        return Err(ProbeError::Answer(format!("refused: {why}")));
                    }
                    Err(e) => last = ProbeError::Failed(e.to_string()),
                }
            }
            tokio::time::sleep(Duration::from_millis(300 * (attempt + 1))).await;
        }
        Err(last)
    }

    /// Brings back the starting state: every daemon running (restarting those that are not,
    /// and an hl-service whose etcd member is gone), every etcd member started, two instances
    /// listed by the allocator and used by the ingress, and (once the load runs) requests all
    /// succeeding for `--settle` after `since`.
    async fn restore(
        &mut self,
        args: &Args,
        since: Option<Instant>,
        done: &mut Vec<String>,
    ) -> Result<(), ProbeError> {
        let give_up = Instant::now() + args.deadline;
        let late = |what: &str| {
            if Instant::now() >= give_up {
                Err(ProbeError::TimedOut {
                    what: format!("{what}: not back"),
                    within: args.deadline,
                })
            } else {
                Ok(())
            }
        };
        let restarting = |e: anyhow::Error| ProbeError::Daemon(format!("{e:#}"));
        if !self.monitor.is_alive() {
            done.push("restarted the ping-monitor (it was not running)".into());
            self.monitor.kill().await;
            self.monitor.start().await.map_err(restarting)?;
        }
        for i in 0..self.lookups.len() {
            let etcd_gone = !self.etcd.is_empty() && self.etcd_member(i).is_none();
            if !self.lookups[i].is_alive() || etcd_gone {
                done.push(format!(
                    "restarted {} ({})",
                    self.lookups[i].label,
                    if etcd_gone {
                        "SIGTERM: its etcd member was gone"
                    } else {
                        "it was not running"
                    }
                ));
                self.lookups[i].terminate(Duration::from_secs(10)).await;
                self.lookups[i].start().await.map_err(restarting)?;
            }
        }
        if !self.allocator.is_alive() {
            done.push("restarted the allocator (it was not running)".into());
            self.allocator.kill().await;
            self.allocator.start().await.map_err(restarting)?;
        }
        if let Some(endpoint) = self.etcd.first() {
            let left = give_up.saturating_duration_since(Instant::now());
            wait_members(endpoint, self.etcd.len(), left).await?;
        }
        // The ingress may ask for an instance itself meanwhile: the count is checked again at
        // the end, and the instances brought back again if it drifted.
        for _ in 0..3 {
            // Exactly two instances whose processes run: more are asked of the allocator, extra
            // ones (the ingress asks for some itself) stopped as the allocator culls them, with
            // SIGTERM to their sidecar.
            let (mut asked, mut stopping) = (0, BTreeSet::new());
            let peers = loop {
                let listed = self.listed().await.unwrap_or_default();
                let live: Vec<&Instance> = listed.iter().filter(|i| i.sidecar.is_some()).collect();
                stopping.retain(|id: &String| live.iter().any(|i| &i.id == id));
                let peers: Vec<String> = live
                    .iter()
                    .filter_map(|i| self.sidecar_peer(&i.id))
                    .collect();
                if live.len() == INSTANCES && peers.len() == INSTANCES {
                    break peers;
                }
                if live.len() > INSTANCES {
                    for extra in &live[INSTANCES..] {
                        if let Some(pid) = extra.sidecar
                            && stopping.insert(extra.id.clone())
                        {
                            done.push(format!("stopped extra instance {} (SIGTERM)", extra.id));
                            signal(pid, libc::SIGTERM);
                        }
                    }
                } else if live.len() < INSTANCES && asked < INSTANCES * 3 {
                    asked += 1;
                    match self.ask_instance().await {
                        Ok(id) => done.push(format!("asked the allocator for an instance: {id}")),
                        Err(why) => {
                            done.push(format!("asking the allocator for an instance: {why}"))
                        }
                    }
                }
                late(&format!("{} instances rather than {INSTANCES}", live.len()))?;
                tokio::time::sleep(POLL).await;
            };
            // The ingress uses them all (before the load runs, a request now and then makes it
            // look the service up: it knows only services it was asked for).
            while !self.ingress_uses(&peers).await {
                if let Err(why) = late("the ingress does not use every instance") {
                    return Err(ProbeError::Answer(format!(
                        "{why}: instances {peers:?}; the ingress lists: {}",
                        self.ingress_view().await
                    )));
                }
                if let (None, Some(ingress)) = (&self.load, &self.ingress) {
                    let uri: Uri = format!("http://{}/{SERVICE}/", ingress.ingress)
                        .parse()
                        .map_err(|e: http::uri::InvalidUri| ProbeError::Failed(e.to_string()))?;
                    let _ =
                        tokio::time::timeout(REQUEST_TIMEOUT, get_hello(&self.client, uri)).await;
                }
                tokio::time::sleep(POLL).await;
            }
            if let (Some(load), Some(_)) = (&self.load, since) {
                let left = give_up.saturating_duration_since(Instant::now());
                load.wait_steady(Instant::now(), args.settle, left)
                    .await
                    .map_err(|_| ProbeError::Answer("requests did not all succeed".into()))?;
            }
            let live = self
                .listed()
                .await
                .unwrap_or_default()
                .iter()
                .filter(|i| i.sidecar.is_some())
                .count();
            if live == INSTANCES {
                break;
            }
            done.push(format!("{live} instances once requests succeeded again"));
        }
        Ok(())
    }

    /// What is wrong now: each item a leftover. `victim` is the process just killed, if one
    /// was: it must be gone.
    async fn leftovers(&self, victim: Option<u32>) -> Vec<String> {
        let mut left = Vec::new();
        // Instances.
        let running = self.instance_processes();
        match self.listed().await {
            Ok(listed) => {
                let ids: BTreeSet<&str> = listed.iter().map(|i| i.id.as_str()).collect();
                for (id, pids) in &running {
                    if !ids.contains(id.as_str()) {
                        left.push(format!(
                            "instance {id} runs ({} processes) but the allocator does not list it",
                            pids.len()
                        ));
                    }
                }
                for instance in &listed {
                    if !running.contains_key(&instance.id) {
                        left.push(format!(
                            "the allocator lists instance {}, which does not run",
                            instance.id
                        ));
                    }
                }
                if let Ok(metric) = self.allocator_metric().await
                    && metric != listed.len()
                {
                    left.push(format!(
                        "allocator_instances is {metric}, /targets lists {}",
                        listed.len()
                    ));
                }
                if let Ok(entries) = std::fs::read_dir(self.instances_dir()) {
                    for entry in entries.flatten() {
                        let id = entry.file_name().to_string_lossy().into_owned();
                        if !ids.contains(id.as_str()) && !running.contains_key(&id) {
                            left.push(format!("instance directory {id} left behind"));
                        }
                    }
                }
            }
            Err(why) => left.push(format!("the allocator's list cannot be read: {why}")),
        }
        // Temporary files.
        let mut stores: Vec<(String, PathBuf)> = self
            .lookups
            .iter()
            .enumerate()
            .map(|(i, l)| (l.label.clone(), self.dir.path().join(format!("lookup-{i}"))))
            .collect();
        stores.push(("allocator".into(), self.allocator_data()));
        for (label, data) in stores {
            let tmp = data.join("blobs/tmp");
            let files: Vec<String> = std::fs::read_dir(&tmp)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            if !files.is_empty() {
                left.push(format!(
                    "{} files in {label}'s blobs/tmp ({})",
                    files.len(),
                    files.join(", ")
                ));
            }
        }
        // Records.
        let bootstrap = self.bootstrap();
        match ours("hl-cli", &["--bootstrap", &bootstrap, "--json", "list"]).await {
            Ok(json) => {
                let names: Vec<String> = serde_json::from_str::<serde_json::Value>(&json)
                    .ok()
                    .and_then(|v| {
                        v.as_array().map(|records| {
                            records
                                .iter()
                                .filter_map(|r| r["name"].as_str().map(str::to_owned))
                                .collect()
                        })
                    })
                    .unwrap_or_default();
                let others: Vec<&String> = names.iter().filter(|n| *n != SERVICE).collect();
                if !others.is_empty() {
                    left.push(format!("records other than {SERVICE}: {others:?}"));
                }
                if !names.iter().any(|n| n == SERVICE) {
                    left.push(format!(
                        "the record of {SERVICE} is missing from `hl-cli list`"
                    ));
                }
            }
            Err(why) => left.push(format!("records not checked: `hl-cli list` failed: {why}")),
        }
        // etcd members and processes.
        if !self.etcd.is_empty() {
            match member_list(&self.etcd).await {
                Ok(members) => {
                    if members.len() != self.etcd.len()
                        || !members.iter().all(|m| m.contains(", started, "))
                    {
                        left.push(format!(
                            "etcd lists {} members for {} lookup services: {}",
                            members.len(),
                            self.etcd.len(),
                            members.join(" / ")
                        ));
                    }
                }
                Err(why) => left.push(format!("`etcdctl member list` failed: {why}")),
            }
        }
        let ours_now: BTreeSet<u32> = std::iter::once(&self.monitor)
            .chain(&self.lookups)
            .chain(std::iter::once(&self.allocator))
            .filter_map(Managed::pid)
            .collect();
        let base = format!("{}/", self.dir.path().display());
        for (pid, cmdline) in processes_matching(&base) {
            if cmdline.contains(&format!("{}/", self.instances_dir().display())) {
                continue; // instances, above
            }
            let name = comm(pid);
            let stray = match name.as_str() {
                "etcd" => stat(pid).is_none_or(|(_, parent)| !ours_now.contains(&parent)),
                _ => !ours_now.contains(&pid),
            };
            if stray {
                left.push(format!("stray {name} process {pid}"));
            }
        }
        // A killed process that is still there, or a zombie nobody reaped.
        if let Some(victim) = victim
            && !ours_now.contains(&victim)
            && let Some((state, parent)) = stat(victim)
        {
            left.push(if state == 'Z' {
                format!(
                    "killed process {victim} is a zombie of {} {parent} (never reaped)",
                    comm(parent)
                )
            } else {
                format!("killed process {victim} ({}) still alive", comm(victim))
            });
        }
        left
    }

    /// Stops everything (SIGTERM, as an operator would; the allocator stops its instances),
    /// then lists what of the run is still there and kills it.
    async fn shut_down(mut self) -> Vec<String> {
        if let Some(mut load) = self.load.take() {
            load.finish().await;
        }
        if let Some(ingress) = self.ingress.take() {
            ingress.process.terminate(Duration::from_secs(5)).await;
        }
        self.allocator.terminate(Duration::from_secs(20)).await;
        for lookup in self.lookups.iter_mut().rev() {
            lookup.terminate(Duration::from_secs(10)).await;
        }
        self.monitor.terminate(Duration::from_secs(5)).await;
        self.node.shutdown().await;
        // Whatever exits on its own (an etcd member after its hl-service) gets a moment.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let base = format!("{}/", self.dir.path().display());
        let survivors: Vec<String> = processes_matching(&base)
            .into_iter()
            .map(|(pid, cmdline)| {
                let short: String = cmdline.chars().take(120).collect();
                format!("{pid} {} (`{short}`)", comm(pid))
            })
            .collect();
        drop(self); // the reaper kills them
        survivors
    }
}

/// The counters that grew from `before` to `after`, as "name +delta, ...".
fn counters_changed(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> String {
    after
        .iter()
        .filter_map(|(name, &now)| {
            let delta = now - before.get(name).copied().unwrap_or(0.0);
            (delta > 0.0).then(|| format!("{name} +{delta}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `etcdctl member list` through any of `endpoints`: one line per member.
async fn member_list(endpoints: &[String]) -> Result<Vec<String>, ProbeError> {
    let endpoints = endpoints.join(",");
    let out = command_output(
        "etcdctl",
        &[
            "--endpoints",
            &endpoints,
            "--command-timeout=3s",
            "member",
            "list",
        ],
        &[("ETCDCTL_API", "3")],
    )
    .await?;
    Ok(out.lines().map(str::to_owned).collect())
}

/// Until `etcdctl member list` through `endpoint` shows `count` members, all started.
async fn wait_members(endpoint: &str, count: usize, within: Duration) -> Result<(), ProbeError> {
    let give_up = Instant::now() + within;
    loop {
        let last = match member_list(&[endpoint.to_owned()]).await {
            Ok(list) if list.len() == count && list.iter().all(|m| m.contains(", started, ")) => {
                return Ok(());
            }
            Ok(list) => list.join(" / "),
            Err(why) => why.to_string(),
        };
        if Instant::now() >= give_up {
            return Err(ProbeError::TimedOut {
                what: format!("{count} started etcd members not seen (last: {last})"),
                within,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(start: Instant, ms: u64, outcome: Option<Outcome>) -> Sample {
        Sample {
            sent: start + Duration::from_millis(ms),
            outcome,
            took: Duration::ZERO,
        }
    }

    #[test]
    fn a_window_counts_failures_by_class_and_recovers_after_the_last() {
        let start = Instant::now();
        let samples = [
            sample(start, 0, Some(Outcome::Ok)),
            sample(start, 100, Some(Outcome::Status(503))),
            sample(start, 200, Some(Outcome::Ok)),
            sample(start, 300, Some(Outcome::Timeout)),
            sample(start, 400, Some(Outcome::Status(503))),
            sample(start, 500, Some(Outcome::Ok)),
            sample(start, 600, None),
        ];
        let tally = Tally::of(&samples, start);
        assert_eq!(tally.sent, 7);
        assert_eq!(tally.pending, 1);
        assert_eq!(tally.failures(), 3);
        assert_eq!(tally.failed_cell(), "3 (2 × 503, 1 × timeout)");
        assert_eq!(tally.recovery, Some(Duration::from_millis(500)));

        let none_failed = Tally::of(&samples[..1], start);
        assert_eq!(none_failed.failed_cell(), "0");
        assert_eq!(none_failed.recovery, Some(Duration::ZERO));
        let never_recovered = Tally::of(&samples[..5], start);
        assert_eq!(never_recovered.recovery, None);
    }

    #[test]
    fn short_text_fits_a_cell() {
        assert_eq!(short("\u{1b}[2mlog\u{1b}[0m a|b\nc"), "log abc");
        let long = "x".repeat(500);
        assert_eq!(short(&long).chars().count(), 161);
    }
}
