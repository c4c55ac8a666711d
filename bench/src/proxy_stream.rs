//! Large bodies through the data plane (`proxy-stream`): on the path of [`ProxyPath`], one
//! response of `--bytes` streamed from the service and one upload of as many bytes streamed to
//! it, straight and through ingress -> QUIC -> sidecar; throughput each way and the proxies'
//! peak memory, which must not grow with the body.

use std::time::{Duration, Instant};

use anyhow::Context;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::BodyExt;

use crate::{
    body::{chunked_body, drain},
    load,
    procs::mib,
    proxy_path::{Peaks, ProxyPath},
    stats::mib_per_s,
};

/// A transfer that takes longer than this has failed.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(clap::Args)]
pub struct Args {
    /// Bytes of the response streamed down and of the upload.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
}

impl Default for Args {
    fn default() -> Self {
        Self { bytes: 1 << 30 }
    }
}

/// Streams `GET uri` (a response of `bytes`) to its end, discarding it; returns how long the
/// whole response took.
async fn download(uri: Uri, bytes: u64) -> anyhow::Result<Duration> {
    let client: load::GetClient = load::client();
    let begin = Instant::now();
    let response = client.get(uri).await?;
    anyhow::ensure!(
        response.status() == StatusCode::OK,
        "answered {}",
        response.status()
    );
    let received = drain(response.into_body()).await?;
    anyhow::ensure!(received == bytes, "received {received} of {bytes} bytes");
    Ok(begin.elapsed())
}

/// Streams `bytes` to `POST uri`, made chunk by chunk; returns how long until the service
/// answered how many it read.
async fn upload(uri: Uri, bytes: u64) -> anyhow::Result<Duration> {
    let client = load::client();
    let request = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .body(chunked_body(bytes))?;
    let begin = Instant::now();
    let response = client.request(request).await?;
    let status = response.status();
    let answer = response.into_body().collect().await?.to_bytes();
    let answer = String::from_utf8_lossy(&answer);
    anyhow::ensure!(status == StatusCode::OK, "answered {status}: {answer}");
    let counted: u64 = answer.parse().context("the service's count")?;
    anyhow::ensure!(
        counted == bytes,
        "the service read {counted} of {bytes} bytes"
    );
    Ok(begin.elapsed())
}

/// Bounds a transfer in time.
async fn timed(
    transfer: impl Future<Output = anyhow::Result<Duration>>,
) -> anyhow::Result<Duration> {
    tokio::time::timeout(TRANSFER_TIMEOUT, transfer)
        .await
        .with_context(|| format!("not done within {TRANSFER_TIMEOUT:?}"))?
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let path = ProxyPath::start().await?;
    let at_start = path.peaks()?;
    let down = format!("/bytes/{}", args.bytes);
    let direct_down = timed(download(path.direct(&down), args.bytes)).await?;
    let ours_down = timed(download(path.through_proxies(&down), args.bytes)).await?;
    let after_down = path.peaks()?;
    let direct_up = timed(upload(path.direct("/drain"), args.bytes)).await?;
    let ours_up = timed(upload(path.through_proxies("/drain"), args.bytes)).await?;
    let after_up = path.peaks()?;

    let size = args.bytes as f64 / (1 << 20) as f64;
    println!("### Data plane: {size:.0} MiB streamed each way\n");
    println!(
        "| transfer | direct | through ingress + sidecar | ingress VmHWM after | sidecar VmHWM after |"
    );
    println!("|---|---|---|---|---|");
    let row = |name: &str, direct: Duration, ours: Duration, peaks: &Peaks| {
        println!(
            "| {name} | {:.0} MiB/s | {:.0} MiB/s ({:.2} s) | {} | {} |",
            mib_per_s(args.bytes, direct),
            mib_per_s(args.bytes, ours),
            ours.as_secs_f64(),
            mib(peaks.ingress),
            mib(peaks.sidecar)
        );
    };
    println!(
        "| at start (after the readiness check) | | | {} | {} |",
        mib(at_start.ingress),
        mib(at_start.sidecar)
    );
    row(
        "download: `GET /bytes/N`",
        direct_down,
        ours_down,
        &after_down,
    );
    row("upload: `POST /drain`", direct_up, ours_up, &after_up);
    println!();
    Ok(())
}
