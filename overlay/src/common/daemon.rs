//! Start-up and shutdown shared by every long-running program: metrics endpoint bound first
//! (a port in use fails before anything else happens), overlay node started, node info
//! served, addresses printed for people to copy, then serving until SIGINT or SIGTERM.

use std::net::SocketAddr;

use anyhow::Context;
use prometheus::Registry;
use tokio::net::TcpSocket;
use tokio_util::sync::CancellationToken;

use super::{http, shutdown_signal};
use crate::{
    overlay::{Node, NodeConfig},
    rpc::serve_node_info,
};

/// A started program: its overlay node and the registry its `/metrics` serves.
pub struct Daemon {
    /// The program's overlay node, already answering node-info requests.
    pub node: Node,
    /// The registry `/metrics` serves. Process metrics (CPU, memory, open files) are already
    /// in it; the program registers its own.
    pub registry: Registry,
    metrics: TcpSocket,
}

impl Daemon {
    /// Binds the metrics endpoint to `metrics_addr` first (a port in use fails here, before
    /// anything else), starts the overlay node from `config`, serves node info, and prints
    /// the node's listen addresses on standard output. `/metrics` listens, is served, and its
    /// URL is printed only once [`Daemon::run_until`] or [`Daemon::run_until_signal`] runs:
    /// a node that cannot join has accepted no scrape it would never answer.
    pub async fn start(config: NodeConfig, metrics_addr: SocketAddr) -> anyhow::Result<Self> {
        let metrics = http::bind(metrics_addr)
            .with_context(|| format!("cannot listen on {metrics_addr} for /metrics"))?;
        let role = config.role.clone();
        let node = Node::start(config)
            .await
            .context("cannot start the overlay node")?;
        serve_node_info(&node);
        let registry = Registry::new();
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        // Standard output is for people (and scripts) to copy from: the addresses others
        // bootstrap from and where the metrics are. Logs go to standard error.
        println!("{role} {} listening on:", node.peer_id());
        for addr in node.listen_addrs().await {
            println!("{addr}");
        }
        let metrics_addr = metrics.local_addr()?;
        tracing::info!(%metrics_addr, peer = %node.peer_id(), "{role} started");
        Ok(Self {
            node,
            registry,
            metrics,
        })
    }

    /// Serves `/metrics` and `routes` until SIGINT or SIGTERM, then stops the node.
    pub async fn run_until_signal(
        self,
        routes: Vec<(&'static str, http::Handler)>,
    ) -> anyhow::Result<()> {
        self.run_until(routes, shutdown_signal()).await
    }

    /// Serves `/metrics` and `routes` until `until` resolves, then stops the node.
    pub async fn run_until(
        self,
        routes: Vec<(&'static str, http::Handler)>,
        until: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let stop = CancellationToken::new();
        let addr = self.metrics.local_addr()?;
        let listener = http::listen(self.metrics)
            .with_context(|| format!("cannot listen on {addr} for /metrics"))?;
        // Printed once it is served: a script that waits for this line can scrape at once.
        println!("metrics: http://{addr}/metrics");
        let server = http::spawn(listener, self.registry, routes, stop.clone());
        until.await;
        stop.cancel();
        self.node.shutdown().await;
        let _ = server.await;
        Ok(())
    }
}
