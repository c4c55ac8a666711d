//! Large bodies (`stream`): through each of the four [`Paths`], one response of `--bytes`
//! streamed from the service and one upload of as many bytes streamed to it; throughput each
//! way and every hop's peak memory, which must not grow with the body.

use std::time::{Duration, Instant};

use anyhow::Context;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::BodyExt;

use crate::{
    body::{chunked_body, drain},
    compare::{Better, compare},
    load,
    paths::{Paths, Via},
    procs::mib,
    report::{Report, outln},
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

impl Args {
    pub fn quick() -> Self {
        Self { bytes: 16 << 20 }
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

pub async fn run(args: Args, out: &mut Report) -> anyhow::Result<()> {
    let command = out.command("stream");
    let paths = Paths::start().await?;
    let size = args.bytes as f64 / (1 << 20) as f64;
    outln!(
        out,
        "## Streaming: {size:.0} MiB each way through each path\n\n`{command}`\n\n\
         One `GET /bytes/N` response and one chunked `POST /drain` upload of N bytes per path, \
         one after the other; the peak RSS (VmHWM) of each hop is read after both. CPU: {}.\n",
        paths.pinned
    );
    outln!(
        out,
        "| path | download | upload | first hop peak RSS | second hop peak RSS |"
    );
    outln!(out, "|---|---|---|---|---|");
    let (mut downloads, mut uploads, mut peaks) = (Vec::new(), Vec::new(), Vec::new());
    let down = format!("/bytes/{}", args.bytes);
    for via in Via::ALL {
        let took_down = timed(download(paths.uri(via, &down), args.bytes)).await?;
        let took_up = timed(upload(paths.uri(via, "/drain"), args.bytes)).await?;
        let hop_peaks = paths.hop_peaks(via)?;
        let (first, second) =
            hop_peaks.map_or(("".to_owned(), "".to_owned()), |(a, b)| (mib(a), mib(b)));
        outln!(
            out,
            "| {} | {:.0} MiB/s ({:.2} s) | {:.0} MiB/s ({:.2} s) | {first} | {second} |",
            via.describe(),
            mib_per_s(args.bytes, took_down),
            took_down.as_secs_f64(),
            mib_per_s(args.bytes, took_up),
            took_up.as_secs_f64(),
        );
        if via != Via::Direct {
            downloads.push((via.name(), mib_per_s(args.bytes, took_down)));
            uploads.push((via.name(), mib_per_s(args.bytes, took_up)));
            if let Some((a, b)) = hop_peaks {
                peaks.push((via.name(), a.max(b) as f64 / 1024.0));
            }
        }
    }
    outln!(out);
    compare(
        out,
        "download throughput",
        "MiB/s",
        Better::Higher,
        &downloads,
    );
    compare(out, "upload throughput", "MiB/s", Better::Higher, &uploads);
    compare(
        out,
        "largest peak RSS of one hop",
        "MiB",
        Better::Lower,
        &peaks,
    );
    outln!(out);
    paths.stop().await;
    Ok(())
}
