//! The lookup service with a large artifact: `hl-cli add` of a synthetic image archive (300 MB
//! by default) to an `hl-service`, a second node fetching the blob over the overlay, and the
//! latency of `get`, cold (a new client joins and finds the service) and warm (the client's
//! connection is open). Peak RSS of hl-cli and hl-service shows that blobs stream.

use std::time::Instant;

use anyhow::Context;
use control::{
    blob::{BlobStore, hash_file, transfer},
    lookup::{
        archive::write_synthetic_archive,
        client,
        protocol::{LookupProtocol, LookupRequest, LookupResponse},
    },
    overlay::{BootstrapAddr, Node, NodeConfig},
};
use libp2p::identity::Keypair;

use crate::{
    procs::{mib, run_measured, start_monitor_and_lookup, status_kb},
    report::{Report, outln},
    stats::{mib_per_s, print_percentiles},
};

#[derive(clap::Args)]
pub struct Args {
    /// Size of the synthetic image archive, in MiB.
    #[arg(long, default_value_t = 300)]
    archive_mib: u64,
    /// Warm `get` requests measured.
    #[arg(long, default_value_t = 200)]
    gets: usize,
    /// Cold `get`s measured (each by a new client node).
    #[arg(long, default_value_t = 20)]
    cold_gets: usize,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            archive_mib: 300,
            gets: 200,
            cold_gets: 20,
        }
    }
}

impl Args {
    pub fn quick() -> Self {
        Self {
            archive_mib: 8,
            gets: 20,
            cold_gets: 3,
        }
    }
}

fn client_config(bootstrap: &BootstrapAddr) -> NodeConfig {
    let mut config = NodeConfig::new("bench-client", Keypair::generate_ed25519());
    config.listen = Vec::new();
    config.dht_server = false;
    config.bootstraps = vec![bootstrap.clone()];
    config
}

pub async fn run(args: Args, out: &mut Report) -> anyhow::Result<()> {
    let command = out.command("lookup");
    let dir = tempfile::tempdir()?;
    let tar = dir.path().join("app.tar");
    let size = args.archive_mib << 20;
    let file = std::fs::File::create(&tar)?;
    tokio::task::spawn_blocking(move || {
        write_synthetic_archive(std::io::BufWriter::new(file), b"bench", size, true)
    })
    .await??;
    let archive_bytes = std::fs::metadata(&tar)?.len();
    let digest = hash_file(&tar)?;

    let (monitor, service) = start_monitor_and_lookup(&dir.path().join("service")).await?;
    let bootstrap = monitor.bootstrap.to_string();
    let service_start_rss = status_kb(service.pid, "VmRSS")?;

    let tar_arg = tar.to_str().context("path")?.to_owned();
    let (add_took, cli_peak) = tokio::task::spawn_blocking(move || {
        run_measured(
            "hl-cli",
            &[
                "--bootstrap",
                &bootstrap,
                "add",
                "--file",
                &tar_arg,
                "bench-app",
            ],
        )
    })
    .await??;
    let service_peak_upload = status_kb(service.pid, "VmHWM")?;

    let fetcher = Node::start(client_config(&monitor.bootstrap)).await?;
    let store = BlobStore::open(&dir.path().join("fetched"))?;
    let begin = Instant::now();
    transfer::fetch(&fetcher, digest, &store).await?;
    let fetch_took = begin.elapsed();
    let service_peak_fetch = status_kb(service.pid, "VmHWM")?;

    // Warm: one client, connection open.
    let peer = client::lookup_services(&fetcher).await?[0];
    let request = LookupRequest::Get("bench-app".into());
    let mut warm = Vec::new();
    for _ in 0..args.gets {
        let begin = Instant::now();
        let answer = fetcher.request::<LookupProtocol>(peer, &request).await?;
        anyhow::ensure!(
            matches!(answer, LookupResponse::Found(_)),
            "unexpected {answer:?}"
        );
        warm.push(begin.elapsed());
    }
    // Cold: a new client joins, finds the lookup service, asks.
    let mut cold = Vec::new();
    for _ in 0..args.cold_gets {
        let begin = Instant::now();
        let node = Node::start(client_config(&monitor.bootstrap)).await?;
        let (_, answer) = client::call(&node, &request).await?;
        anyhow::ensure!(
            matches!(answer, LookupResponse::Found(_)),
            "unexpected {answer:?}"
        );
        cold.push(begin.elapsed());
        node.shutdown().await;
    }

    outln!(
        out,
        "## Lookup: a {} MiB image archive, and `get` latency\n\n`{command}`\n\n\
         `ping-monitor` and `hl-service` (embedded store) as processes; `hl-cli add --file` of \
         a synthetic image archive (docker-save layout, one layer); a second node in this \
         process fetches the blob over the overlay; then `get` from a client whose connection \
         is open (warm) and from a new client that joins, finds the lookup through the DHT and \
         asks (cold). Peak RSS of hl-cli is `ru_maxrss` from `wait4`, of hl-service `VmHWM`. \
         Both ends stream 256 KiB chunks and hash as they go, so memory does not grow with \
         the blob.\n",
        args.archive_mib
    );
    outln!(out, "| measure | value |");
    outln!(out, "|---|---|");
    outln!(
        out,
        "| `hl-cli add --file` (inspect, hash, upload, record) | {:.2} s, {:.0} MiB/s |",
        add_took.as_secs_f64(),
        mib_per_s(archive_bytes, add_took)
    );
    outln!(out, "| hl-cli peak RSS | {} |", mib(cli_peak));
    outln!(
        out,
        "| hl-service RSS at start | {} |",
        mib(service_start_rss)
    );
    outln!(
        out,
        "| hl-service peak RSS after the upload | {} |",
        mib(service_peak_upload)
    );
    outln!(
        out,
        "| second node fetches the blob over the overlay | {:.2} s, {:.0} MiB/s |",
        fetch_took.as_secs_f64(),
        mib_per_s(archive_bytes, fetch_took)
    );
    outln!(
        out,
        "| hl-service peak RSS after serving the fetch | {} |",
        mib(service_peak_fetch)
    );
    outln!(out);
    print_percentiles(
        out,
        "get",
        &[50.0, 99.0, 100.0],
        &mut [
            ("warm (connection open)", &mut warm),
            ("cold (join, find, ask)", &mut cold),
        ],
    );
    fetcher.shutdown().await;
    drop((service, monitor));
    Ok(())
}
