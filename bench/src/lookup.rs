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

fn client_config(bootstrap: &BootstrapAddr) -> NodeConfig {
    let mut config = NodeConfig::new("bench-client", Keypair::generate_ed25519());
    config.listen = Vec::new();
    config.dht_server = false;
    config.bootstraps = vec![bootstrap.clone()];
    config
}

pub async fn run(args: Args) -> anyhow::Result<()> {
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

    println!(
        "### Lookup: a {} MiB image archive, and `get` latency\n",
        args.archive_mib
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| `hl-cli add --file` (inspect, hash, upload, record) | {:.2} s, {:.0} MiB/s |",
        add_took.as_secs_f64(),
        mib_per_s(archive_bytes, add_took)
    );
    println!("| hl-cli peak RSS | {} |", mib(cli_peak));
    println!("| hl-service RSS at start | {} |", mib(service_start_rss));
    println!(
        "| hl-service peak RSS after the upload | {} |",
        mib(service_peak_upload)
    );
    println!(
        "| second node fetches the blob over the overlay | {:.2} s, {:.0} MiB/s |",
        fetch_took.as_secs_f64(),
        mib_per_s(archive_bytes, fetch_took)
    );
    println!(
        "| hl-service peak RSS after serving the fetch | {} |",
        mib(service_peak_fetch)
    );
    println!();
    print_percentiles(
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
