//! The `cold-start` scenario (issue #5): request to first byte for a service with no instance
//! running, so that the ingress asks an allocator to start one. Per runtime (processes, then
//! Docker if an engine answers): a ping-monitor, an hl-service where hl-cli registers the
//! hello-world service, an allocator culling idle instances after a second, and for every run
//! a fresh ingress proxy; then as many runs through one ingress kept across them, for which
//! each culled instance may still be listed by the ingress (its proxy said goodbye and withdrew
//! its provider record as it stopped: the ingress passes over it at once), and one more
//! through it after `--quiet` (150 s) with no request at all, by when its instances are long
//! gone from the overlay (withdrawn, or expired if killed): the ingress should list none of
//! them and go straight to an allocation. A run waits until the allocator reports no instance
//! of the service, starts the ingress (or not), then times `GET /<service>/` to the first byte
//! of a 200 "Hello, world".
//!
//! Where the time goes comes from the programs' logs, timed as the benchmark reads them: the
//! allocator's "start requested", the ingress's "instance started" (the allocator answered)
//! and "instance found" (the new sidecar appeared as a provider and told its data-plane
//! address), and the allocator's `allocator_start_duration_seconds`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use http::{StatusCode, Uri};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use crate::{
    load::{self, GetClient},
    procs::{Extra, LogLine, run_output, sibling_binary, start_daemon_with},
    proxy_path::{Lookup, StartedProxy, start_proxy_with},
    report::{Report, outln},
    scrape::{scrape, value},
    stats::{ms, percentile, print_table},
};

/// Where `sidecar-image/build.sh` puts the image archive (under the workspace).
const IMAGE_DIR: &str = "target/bench-image";
/// The tag the benchmark's image is built with, apart from `:latest` that others may use.
const IMAGE_TAG: &str = "multi-tier-cloud/hello-world-server:bench";
/// The ingress logs what the breakdown needs: "instance started" (info) and "instance found"
/// (debug).
const INGRESS_LOG: &str = "info,proxy::ingress::instances=debug";
/// How often the allocator's metrics are read while waiting for a cull.
const POLL: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Runtime {
    Process,
    Docker,
}

impl Runtime {
    fn name(self) -> &'static str {
        match self {
            Self::Process => "process",
            Self::Docker => "docker",
        }
    }

    /// The name the service is registered under.
    fn service(self) -> &'static str {
        match self {
            Self::Process => "hello-world-server",
            Self::Docker => "hello-world-docker",
        }
    }

    /// The allocator's ports (apart, so the two never meet in the kernel's TIME_WAITs).
    fn port_range(self) -> &'static str {
        match self {
            Self::Process => "22000-22999",
            Self::Docker => "23000-23999",
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// Cold starts measured per runtime, after a first one (which fetches the artifact to the
    /// allocator and, with Docker, loads the image).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// The runtimes measured, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["process", "docker"])]
    runtimes: Vec<Runtime>,
    /// A run (waiting for the cull, starting the ingress, the request) that takes longer
    /// fails.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// After the runs through the kept ingress, one more through it after this long with no
    /// request at all (0: none): every instance it knew is long culled and its provider record
    /// withdrawn (or, had it been killed, expired: 120 s). Meanwhile its /metrics are read every second, to see when the culled
    /// instances leave them.
    #[arg(long, default_value = "150s", value_parser = humantime::parse_duration)]
    quiet: Duration,
    /// The hello-world image archive; by default `sidecar-image/build.sh target/bench-image`
    /// builds it (minutes the first time: static musl binaries).
    #[arg(long)]
    image_tar: Option<PathBuf>,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            runs: 10,
            runtimes: vec![Runtime::Process, Runtime::Docker],
            timeout: Duration::from_secs(30),
            quiet: Duration::from_secs(150),
            image_tar: None,
        }
    }
}

impl Args {
    /// Two runs; Docker only with an image already built (`MTC_TEST_IMAGE_TAR`, as
    /// `scripts/test.sh` sets it), since building one takes minutes.
    pub fn quick() -> Self {
        let image_tar = std::env::var_os("MTC_TEST_IMAGE_TAR").map(PathBuf::from);
        let mut runtimes = vec![Runtime::Process];
        if image_tar.is_some() {
            runtimes.push(Runtime::Docker);
        }
        Self {
            runs: 2,
            runtimes,
            timeout: Duration::from_secs(30),
            quiet: Duration::ZERO,
            image_tar,
        }
    }
}

/// When each step of one cold start was seen, from the request's send.
#[derive(Default, Clone, Copy)]
struct Steps {
    /// The allocator logged "start requested".
    asked: Option<Duration>,
    /// The ingress logged "instance started": the allocator's answer arrived.
    answered: Option<Duration>,
    /// The ingress logged "instance found": the sidecar is a provider, its address known.
    found: Option<Duration>,
    /// The allocator's `allocator_start_duration_seconds` for this start.
    allocator_metric: Option<Duration>,
}

/// The cold start through the kept ingress after a quiet spell.
struct AfterQuiet {
    quiet: Duration,
    /// Instances of the service the ingress listed on /metrics as the quiet spell began.
    listed: usize,
    /// When into the quiet spell it listed none any more, if it did.
    emptied: Option<Duration>,
    run: Run,
}

/// One cold start: its request-to-first-byte time, or why it failed.
struct Run {
    outcome: Result<Duration, String>,
    steps: Steps,
}

pub async fn run(args: Args, out: &mut Report) -> anyhow::Result<()> {
    let command = out.command("cold-start");
    outln!(
        out,
        "## Cold start: request to first byte with no instance running\n\n`{command}`\n\n\
         Per runtime: a ping-monitor, an hl-service where hl-cli registers the hello-world \
         service, an allocator culling idle instances after a second, and for every run a \
         fresh ingress proxy; then as many runs through one ingress kept across them (each \
         culled instance may still be listed by the ingress when the next request comes: it \
         must pass over it), and one more through it after a quiet spell with no request at \
         all, by when the culled instances are long gone from the overlay. A run \
         waits until the allocator reports no instance of the \
         service, then times `GET /<service>/` to the first byte of a 200 \"Hello, world\". \
         Where the time goes comes from the programs' logs as the benchmark reads them \
         (allocator \"start requested\", ingress \"instance started\" and \"instance found\") \
         and the allocator's `allocator_start_duration_seconds`.\n"
    );
    for &runtime in &args.runtimes {
        if runtime == Runtime::Docker && !docker_available().await {
            outln!(
                out,
                "### Docker runtime\n\nDocker is not available (`docker info` failed): the \
                 Docker runtime is skipped.\n"
            );
            continue;
        }
        let (runs, kept, after_quiet) = measure(runtime, &args).await?;
        report(out, runtime, &runs, &kept, after_quiet.as_ref());
    }
    Ok(())
}

async fn docker_available() -> bool {
    tokio::process::Command::new("docker")
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// Sets up one runtime and runs the first cold start and then `args.runs` more, each through
/// a fresh ingress; then `args.runs` through one ingress kept across them.
async fn measure(
    runtime: Runtime,
    args: &Args,
) -> anyhow::Result<(Vec<Run>, Vec<Run>, Option<AfterQuiet>)> {
    let service = runtime.service();
    let lookup = Lookup::start().await?;
    let proxy = sibling_binary("proxy")?;
    let proxy = proxy.to_str().context("path")?;
    match runtime {
        Runtime::Process => {
            let executable = sibling_binary("helloworldserver")?;
            let executable = executable.to_str().context("path")?;
            let command = ["--", "helloworldserver", "$SERVICE_PORT"];
            let mut add = vec!["--exec", executable, service];
            add.extend(command);
            lookup.add(&add).await?;
        }
        Runtime::Docker => {
            let tar = match &args.image_tar {
                Some(tar) => tar.clone(),
                None => build_image().await?,
            };
            lookup
                .add(&["--file", tar.to_str().context("path")?, service])
                .await?;
            // So that the first start loads the image from the archive the overlay holds.
            remove_image(&image_id(&lookup, service).await?).await?;
        }
    }

    let data = lookup.dir.path().join("allocator");
    let (allocator_logs, mut allocator_log) = mpsc::unbounded_channel();
    let mut flags = vec![
        "--bootstrap",
        &lookup.bootstrap,
        "--runtime",
        runtime.name(),
        "--data-dir",
        data.to_str().context("path")?,
        "--host-ip",
        "127.0.0.1",
        "--check-interval",
        "200ms",
        "--idle-timeout",
        "1s",
        "--boot-grace",
        "0s",
        "--port-range",
        runtime.port_range(),
    ];
    if runtime == Runtime::Process {
        flags.extend(["--proxy-binary", proxy]);
    }
    let allocator = start_daemon_with(
        "allocator",
        &flags,
        Some("runtime: "),
        Extra {
            env: &[("RUST_LOG", "info")],
            stderr: Some(allocator_logs),
            ..Extra::default()
        },
    )
    .await?;

    let client: GetClient = load::client();
    let mut runs = Runs {
        client: &client,
        bootstrap: &lookup.bootstrap,
        allocator: allocator.metrics,
        allocator_log: &mut allocator_log,
        service,
        timeout: args.timeout,
        runtime,
    };
    let fresh = runs.measure("", args.runs + 1, None).await;
    // The same through one ingress kept across the runs: each culled instance is still
    // listed on the overlay when the next request comes.
    let mut kept = logged_ingress(&lookup.bootstrap).await?;
    let kept_runs = runs
        .measure("kept-ingress ", args.runs, Some(&mut kept))
        .await;
    let after_quiet = if args.quiet.is_zero() {
        None
    } else {
        eprintln!(
            "{}: {} of quiet",
            runtime.name(),
            humantime::format_duration(args.quiet)
        );
        // Not a synchronisation: the quiet spell is what is measured, and the list read
        // during it.
        let began = Instant::now();
        let (mut listed, mut emptied) = (None, None);
        while began.elapsed() < args.quiet {
            // A read that failed says nothing either way.
            if let Some(now) = listed_instances(&client, kept.0.metrics, service).await {
                listed.get_or_insert(now);
                if now == 0 && emptied.is_none() {
                    emptied = Some(began.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let mut run = runs.measure("after-quiet ", 1, Some(&mut kept)).await;
        Some(AfterQuiet {
            quiet: args.quiet,
            listed: listed.unwrap_or_default(),
            emptied,
            run: run.remove(0),
        })
    };
    let (kept, _) = kept;
    kept.process.terminate(Duration::from_secs(5)).await;
    // The last instance goes as the others did, so that nothing outlives the allocator.
    if let Err(why) = no_instance(&client, allocator.metrics, service, args.timeout).await {
        eprintln!("the last {} instance was not culled: {why}", runtime.name());
    }
    allocator.terminate(Duration::from_secs(15)).await;
    Ok((fresh, kept_runs, after_quiet))
}

/// How many instances of `service` an ingress lists on /metrics; `None` if they cannot be
/// read.
async fn listed_instances(client: &GetClient, metrics: SocketAddr, service: &str) -> Option<usize> {
    let text = scrape(client, metrics).await.ok()?;
    let label = format!("service=\"{service}\"");
    Some(
        text.lines()
            .filter(|l| l.starts_with("proxy_instance_in_flight{") && l.contains(&label))
            .count(),
    )
}

/// What every cold start of one runtime needs.
struct Runs<'a> {
    client: &'a GetClient,
    bootstrap: &'a str,
    allocator: SocketAddr,
    allocator_log: &'a mut mpsc::UnboundedReceiver<LogLine>,
    service: &'a str,
    timeout: Duration,
    runtime: Runtime,
}

impl Runs<'_> {
    /// `n` cold starts, each through a fresh ingress or all through `kept`, logged as they
    /// go (`label` says which).
    async fn measure(
        &mut self,
        label: &str,
        n: usize,
        mut kept: Option<&mut (StartedProxy, mpsc::UnboundedReceiver<LogLine>)>,
    ) -> Vec<Run> {
        let mut runs = Vec::with_capacity(n);
        for i in 0..n {
            let ingress = match kept.as_deref_mut() {
                Some((ingress, log)) => Ingress::Kept(ingress, log),
                None => Ingress::Fresh,
            };
            let run = cold_start(
                self.client,
                self.bootstrap,
                self.allocator,
                &mut *self.allocator_log,
                self.service,
                self.timeout,
                ingress,
            )
            .await;
            let name = self.runtime.name();
            match &run.outcome {
                Ok(took) => eprintln!("{name} {label}run {i}: {} ms", ms(*took)),
                Err(why) => eprintln!("{name} {label}run {i} failed: {why}"),
            }
            runs.push(run);
        }
        runs
    }
}

/// The ingress a cold start goes through.
enum Ingress<'a> {
    /// A fresh one, started for the run.
    Fresh,
    /// One kept across runs, and its log: it used the instances culled before.
    Kept(&'a StartedProxy, &'a mut mpsc::UnboundedReceiver<LogLine>),
}

/// Starts an ingress whose log lines go to the returned receiver.
async fn logged_ingress(
    bootstrap: &str,
) -> anyhow::Result<(StartedProxy, mpsc::UnboundedReceiver<LogLine>)> {
    let (logs, log) = mpsc::unbounded_channel();
    let extra = Extra {
        env: &[("RUST_LOG", INGRESS_LOG)],
        stderr: Some(logs),
        ..Extra::default()
    };
    Ok((start_proxy_with(bootstrap, &[], &[], extra).await?, log))
}

/// One cold start: waits until the service has no instance, starts a fresh ingress (or uses
/// the kept one), times the request.
async fn cold_start(
    client: &GetClient,
    bootstrap: &str,
    metrics: SocketAddr,
    allocator_log: &mut mpsc::UnboundedReceiver<LogLine>,
    service: &str,
    timeout: Duration,
    ingress: Ingress<'_>,
) -> Run {
    let mut steps = Steps::default();
    let outcome = async {
        let give_up = tokio::time::Instant::now() + timeout;
        no_instance(client, metrics, service, timeout).await?;
        let before = start_histogram(client, metrics).await?;
        let mut fresh = None;
        let (ingress, ingress_log) = match ingress {
            Ingress::Kept(ingress, log) => (ingress, log),
            Ingress::Fresh => {
                let started = tokio::time::timeout_at(give_up, logged_ingress(bootstrap))
                    .await
                    .map_err(|_| "the ingress did not start in time".to_owned())?
                    .map_err(|e| format!("the ingress did not start: {e:#}"))?;
                let (ingress, log) = fresh.insert(started);
                (&*ingress, log)
            }
        };
        while ingress_log.try_recv().is_ok() {}
        let addr = ingress.ingress;
        while allocator_log.try_recv().is_ok() {}
        let uri: Uri = format!("http://{addr}/{service}/")
            .parse()
            .map_err(|e| format!("{e}"))?;

        let sent = Instant::now();
        let answer = tokio::time::timeout_at(give_up, client.get(uri)).await;
        let took = sent.elapsed();
        let response = answer
            .map_err(|_| format!("no answer within {timeout:?}"))?
            .map_err(|e| format!("request failed: {e}"))?;
        let status = response.status();
        let body = tokio::time::timeout_at(give_up, response.into_body().collect())
            .await
            .map_err(|_| "the body did not arrive in time".to_owned())?
            .map_err(|e| format!("body failed: {e}"))?
            .to_bytes();
        let body = String::from_utf8_lossy(&body);
        if status != StatusCode::OK || !body.contains("Hello, world") {
            return Err(format!("answered {status}: {}", body.trim()));
        }

        // The lines were written before the response; give the readers a moment.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let since = |at: Instant| at.checked_duration_since(sent);
        while let Ok((at, line)) = allocator_log.try_recv() {
            if steps.asked.is_none() && line.contains("start requested") {
                steps.asked = since(at);
            }
        }
        while let Ok((at, line)) = ingress_log.try_recv() {
            if steps.answered.is_none() && line.contains("instance started") {
                steps.answered = since(at);
            }
            if steps.found.is_none() && line.contains("instance found") {
                steps.found = since(at);
            }
        }
        let after = start_histogram(client, metrics).await?;
        if after.1 == before.1 + 1 {
            steps.allocator_metric = Some(Duration::from_secs_f64(after.0 - before.0));
        }
        drop(fresh);
        Ok(took)
    }
    .await;
    Run { outcome, steps }
}

/// Until the allocator's `allocator_instances{service="..."}` is 0 or absent.
async fn no_instance(
    client: &GetClient,
    metrics: SocketAddr,
    service: &str,
    timeout: Duration,
) -> Result<(), String> {
    let series = format!("allocator_instances{{service=\"{service}\"}}");
    let give_up = Instant::now() + timeout;
    loop {
        let text = scrape(client, metrics).await.map_err(|e| e.to_string())?;
        if value(&text, &series).unwrap_or(0.0) == 0.0 {
            return Ok(());
        }
        if Instant::now() > give_up {
            return Err(format!("an instance still ran after {timeout:?}"));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Sum and count of the allocator's `allocator_start_duration_seconds`.
async fn start_histogram(client: &GetClient, metrics: SocketAddr) -> Result<(f64, u64), String> {
    let text = scrape(client, metrics).await.map_err(|e| e.to_string())?;
    let sum = value(&text, "allocator_start_duration_seconds_sum").unwrap_or(0.0);
    let count = value(&text, "allocator_start_duration_seconds_count").unwrap_or(0.0);
    Ok((sum, count as u64))
}

/// Builds the image archive with `sidecar-image/build.sh` and returns its path.
async fn build_image() -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the workspace")?;
    eprintln!("building the image: sidecar-image/build.sh {IMAGE_DIR} (minutes the first time)");
    let output = tokio::process::Command::new(root.join("sidecar-image/build.sh"))
        .arg(IMAGE_DIR)
        .current_dir(root)
        .env("IMAGE_TAG", IMAGE_TAG)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .await
        .context("cannot run sidecar-image/build.sh")?;
    if !output.status.success() {
        bail!("sidecar-image/build.sh failed ({})", output.status);
    }
    let stdout = String::from_utf8(output.stdout)?;
    let tar = stdout.lines().last().context("build.sh printed no path")?;
    Ok(PathBuf::from(tar.trim()))
}

/// The image ID in the lookup's record of `service`.
async fn image_id(lookup: &Lookup, service: &str) -> anyhow::Result<String> {
    let json = run_output(
        "hl-cli",
        &["--bootstrap", &lookup.bootstrap, "get", "--json", service],
    )
    .await?;
    let record: serde_json::Value = serde_json::from_str(&json)?;
    record["artifact"]["image_id"]
        .as_str()
        .map(str::to_owned)
        .context("the record names no image ID")
}

/// Removes the image (every tag of it) from the engine; gone already is fine.
async fn remove_image(id: &str) -> anyhow::Result<()> {
    let output = tokio::process::Command::new("docker")
        .args(["rmi", "-f", id])
        .stdin(Stdio::null())
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() && !stderr.contains("No such image") {
        bail!("docker rmi -f {id} failed: {}", stderr.trim());
    }
    eprintln!(
        "removed image {id} from the engine{}",
        if output.status.success() {
            ""
        } else {
            " (it was not there)"
        }
    );
    Ok(())
}

const PERCENTILES: [f64; 4] = [50.0, 99.0, 0.0, 100.0];

/// The cells of a row of [`PERCENTILES`]; dashes for no samples.
fn cells(samples: &mut [Duration]) -> Vec<String> {
    PERCENTILES
        .iter()
        .map(|&p| {
            if samples.is_empty() {
                "-".to_owned()
            } else {
                ms(percentile(samples, p))
            }
        })
        .collect()
}

fn report(
    out: &mut Report,
    runtime: Runtime,
    runs: &[Run],
    kept: &[Run],
    after_quiet: Option<&AfterQuiet>,
) {
    let (first, rest) = runs.split_first().expect("at least the first run");
    let (name, loaded) = match runtime {
        Runtime::Process => ("process", "artifact fetched"),
        Runtime::Docker => ("Docker", "artifact fetched, image loaded"),
    };
    outln!(out, "### {name} runtime (`{}`)\n", runtime.service());

    let mut first_sample: Vec<Duration> = first.outcome.iter().copied().collect();
    let first_name = format!(
        "first run ({loaded}; {} failed)",
        usize::from(first.outcome.is_err())
    );
    let mut samples: Vec<Duration> = rest.iter().filter_map(|r| r.outcome.clone().ok()).collect();
    let rest_name = format!(
        "{} cold starts after it ({} failed)",
        rest.len(),
        rest.len() - samples.len()
    );
    let mut kept_samples: Vec<Duration> =
        kept.iter().filter_map(|r| r.outcome.clone().ok()).collect();
    let kept_name = format!(
        "{} through one ingress kept across them ({} failed)",
        kept.len(),
        kept.len() - kept_samples.len()
    );
    let mut rows = vec![
        (first_name, cells(&mut first_sample)),
        (rest_name, cells(&mut samples)),
        (kept_name, cells(&mut kept_samples)),
    ];
    if let Some(after) = after_quiet {
        let mut sample: Vec<Duration> = after.run.outcome.iter().copied().collect();
        rows.push((
            format!(
                "1 through the kept ingress after {} of quiet ({} failed)",
                humantime::format_duration(after.quiet),
                usize::from(after.run.outcome.is_err())
            ),
            cells(&mut sample),
        ));
    }
    let rows: Vec<(&str, Vec<String>)> = rows
        .iter()
        .map(|(name, cells)| (name.as_str(), cells.clone()))
        .collect();
    print_table(out, "request to first byte", &PERCENTILES, &rows);
    if let Some(after) = after_quiet {
        let emptied = after.emptied.map_or_else(
            || "still listed some at its end".to_owned(),
            |at| format!("listed none from {:.0} s into it on", at.as_secs_f64()),
        );
        outln!(
            out,
            "The kept ingress listed {} instances of the service on /metrics as the quiet spell \
             began (each culled about a second after its request, withdrawing its provider \
             record as it stopped), and {emptied}.\n",
            after.listed
        );
    }

    // Where the time goes, over the runs after the first.
    let between = |from: fn(&Steps) -> Option<Duration>, to: fn(&Steps) -> Option<Duration>| {
        rest.iter()
            .filter(|r| r.outcome.is_ok())
            .filter_map(|r| to(&r.steps)?.checked_sub(from(&r.steps)?))
            .collect::<Vec<_>>()
    };
    let start = |_: &Steps| Some(Duration::ZERO);
    let found_to_byte: Vec<Duration> = rest
        .iter()
        .filter_map(|r| r.outcome.as_ref().ok()?.checked_sub(r.steps.found?))
        .collect();
    let mut phases = [
        (
            "ingress: record lookup, provider search, allocator search (to the allocator's \
             \"start requested\")",
            between(start, |s| s.asked),
        ),
        (
            "allocator: start request to instance started (`allocator_start_duration_seconds`)",
            rest.iter()
                .filter(|r| r.outcome.is_ok())
                .filter_map(|r| r.steps.allocator_metric)
                .collect(),
        ),
        (
            "\"start requested\" to the answer at the ingress (logs)",
            between(|s| s.asked, |s| s.answered),
        ),
        (
            "answer to the sidecar found as a provider (ingress \"instance found\")",
            between(|s| s.answered, |s| s.found),
        ),
        (
            "found to first byte: probe, QUIC handshake, request",
            found_to_byte,
        ),
    ];
    let rows: Vec<(&str, Vec<String>)> = phases
        .iter_mut()
        .map(|(name, samples)| (*name, cells(samples)))
        .collect();
    print_table(
        out,
        &format!(
            "where the time goes ({} runs after the first)",
            samples.len()
        ),
        &PERCENTILES,
        &rows,
    );

    let steps = |r: &Run| {
        let s = &r.steps;
        let at = |d: Option<Duration>| d.map(ms).unwrap_or_else(|| "-".into());
        format!(
            "asked {} / answered {} / found {} (allocator metric {})",
            at(s.asked),
            at(s.answered),
            at(s.found),
            at(s.allocator_metric)
        )
    };
    outln!(
        out,
        "Each run (ms from the request; steps as seen in the logs):\n"
    );
    for (i, r) in runs.iter().enumerate() {
        match &r.outcome {
            Ok(took) => outln!(out, "- run {i}: first byte {}: {}", ms(*took), steps(r)),
            Err(why) => outln!(out, "- run {i}: failed: {why}"),
        }
    }
    for (i, r) in kept.iter().enumerate() {
        match &r.outcome {
            Ok(took) => outln!(
                out,
                "- kept-ingress run {i}: first byte {}: {}",
                ms(*took),
                steps(r)
            ),
            Err(why) => outln!(out, "- kept-ingress run {i}: failed: {why}"),
        }
    }
    if let Some(after) = after_quiet {
        match &after.run.outcome {
            Ok(took) => outln!(
                out,
                "- after the quiet spell: first byte {}: {}",
                ms(*took),
                steps(&after.run)
            ),
            Err(why) => outln!(out, "- after the quiet spell: failed: {why}"),
        }
    }
    outln!(out);
}
