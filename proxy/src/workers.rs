//! Share-nothing workers (`--worker-threads N`): N event loops, each a Tokio current-thread
//! runtime on a thread of its own, with nothing shared on the path of a request.
//!
//! # What each worker has
//! - **Its HTTP listener** on the ingress port. With N > 1 the N listeners are one
//!   `SO_REUSEPORT` group and the kernel spreads client connections over them (by a hash of
//!   the connection's addresses), as nginx's `reuseport` does.
//! - **Its QUIC endpoint on the data-plane port**, for the connections other proxies open to
//!   this one: with N > 1 again one `SO_REUSEPORT` group, in which a UDP flow's 4-tuple
//!   always hashes to the same socket, so a peer's connection lives on one worker.
//! - **With N > 1, a QUIC endpoint of its own on an ephemeral port** for the connections it
//!   opens: the replies to a connection opened from the shared port would be hashed to any
//!   worker's socket, whose endpoint knows nothing of that connection.
//! - **Its own ingress** ([`Ingress`]: routing cores, lookup cache, connections to instances
//!   and their probes) and **its own sidecar** ([`Sidecar::for_worker`]: connections to the
//!   service). So N workers hold N connections per peer and probe each instance N times, and
//!   each asks for an allocation on its own when it finds no instance (the allocator starts
//!   one for a burst of asks: its reuse window).
//!
//! # What they share
//! The overlay node (lookups, discovery and allocations reach it by channel, never per
//! request), the service's health checks, the activity counters the allocator culls on, and
//! the metrics registry (atomic counters; the live views of every worker are read when
//! scraped).
//!
//! # Sockets are bound first
//! Every socket of every worker is bound ([`bind`]) before the overlay advertises the
//! data-plane address: a `SO_REUSEPORT` group that grows rehashes flows to its new member,
//! which would cut a peer's connection made in between.
//!
//! The first worker runs on the main thread, beside the overlay and the metrics endpoint, so
//! one worker (the default) is one thread.

use std::{
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Weak},
    time::Duration,
};

use anyhow::Context;
use libp2p::identity::Keypair;
use mtc_overlay::overlay::Node;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::{
    app::Program,
    config::perf::Tuning,
    ingress::{Ingress, IngressSettings},
    l4::{TunnelMetrics, datagrams::DatagramRouter, front::L4Front, hop::HopRole},
    metrics::{Activity, IngressMetrics, ServiceView},
    sidecar::Sidecar,
    transport::{EndpointRole, Transport},
};

/// How long in-flight requests may finish after a shutdown begins.
const DRAIN: Duration = Duration::from_secs(5);
/// How long a worker's QUIC connections get to close before it ends.
const CLOSE: Duration = Duration::from_secs(1);
/// Pending client connections per listener (as Tokio's own `bind`).
const BACKLOG: i32 = 1024;

/// The sockets of one worker, bound but not yet given to any runtime. The HTTP socket is
/// bound (its port is known, and taken) but listens only once its worker starts, after the
/// proxy has joined the overlay: a proxy that cannot join (a wrong network key, no bootstrap)
/// exits having accepted no client it could not serve.
pub struct Sockets {
    /// The ingress (or l4-proxy's control API, which only the first worker serves).
    http: Option<Socket>,
    /// Its share of the data-plane port.
    quic: std::net::UdpSocket,
    /// With several workers: the endpoint its own connections are opened from.
    dial: Option<std::net::UdpSocket>,
}

/// Binds the sockets of `workers` workers: HTTP on `http` for the first `http_workers` of
/// them, QUIC on `quic`. With one worker, plain sockets (a port in use is an error, as it
/// always was); with more, `SO_REUSEPORT` groups, the port of the first socket (when 0 was
/// asked for) taken by the others.
pub fn bind(
    workers: usize,
    http_workers: usize,
    mut http: SocketAddr,
    mut quic: SocketAddr,
) -> anyhow::Result<Vec<Sockets>> {
    anyhow::ensure!(workers >= 1, "--worker-threads must be at least 1");
    let shared = workers > 1;
    let mut all = Vec::with_capacity(workers);
    for index in 0..workers {
        let listener = if index < http_workers {
            let socket =
                tcp_socket(http, shared).with_context(|| format!("cannot listen on {http}"))?;
            http = socket
                .local_addr()?
                .as_socket()
                .context("a TCP socket has an IP address")?;
            Some(socket)
        } else {
            None
        };
        let socket =
            udp_socket(quic, shared).with_context(|| format!("cannot listen on {quic} (UDP)"))?;
        quic = socket.local_addr()?;
        let dial = if shared {
            let any = SocketAddr::new(quic.ip(), 0);
            Some(udp_socket(any, false).with_context(|| format!("cannot bind {any} (UDP)"))?)
        } else {
            None
        };
        all.push(Sockets {
            http: listener,
            quic: socket,
            dial,
        });
    }
    Ok(all)
}

impl Sockets {
    /// Where the HTTP listener is, if this worker has one.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref()?.local_addr().ok()?.as_socket()
    }

    /// The data-plane address (every worker's is the same).
    pub fn quic_addr(&self) -> std::io::Result<SocketAddr> {
        self.quic.local_addr()
    }
}

/// A TCP socket bound to `addr`, not yet listening ([`listen`] does that).
fn tcp_socket(addr: SocketAddr, shared: bool) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As Tokio's `bind`: a restarted proxy may listen again at once.
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(shared)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Starts listening on a socket [`tcp_socket`] bound, for this thread's runtime.
fn listen(socket: Socket) -> std::io::Result<tokio::net::TcpListener> {
    socket.listen(BACKLOG)?;
    tokio::net::TcpListener::from_std(socket.into())
}

fn udp_socket(addr: SocketAddr, shared: bool) -> std::io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(shared)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// What every worker is given.
#[derive(Clone)]
pub struct Shared {
    /// Which program runs: what the first worker's HTTP listener serves.
    pub program: Program,
    /// The overlay node: lookups, discovery and allocations go through it.
    pub node: Node,
    /// The overlay identity, which the data plane proves.
    pub keypair: Keypair,
    /// The overlay's 32-byte pre-shared key when it is a private network; the data plane
    /// proves it too.
    pub network_key: Option<[u8; 32]>,
    /// How each worker's ingress behaves (from the flags).
    pub settings: IngressSettings,
    /// The ingress's series; each worker counts its accepted connections under its index.
    pub metrics: IngressMetrics,
    /// The series of layer-4 tunnels.
    pub tunnel_metrics: TunnelMetrics,
    /// Requests served and in flight, across workers (the idle time the allocator culls on).
    pub activity: Arc<Activity>,
    /// Service mode: the service's name and the sidecar each worker's is made from.
    pub sidecar: Option<(String, Arc<Sidecar>)>,
    /// l4-proxy: the IP tunnels' local ends listen on, and the UDP idle timeout.
    pub listen_ip: IpAddr,
    /// l4-proxy: what one UDP client may hold and send (`--udp-idle-timeout`,
    /// `--max-udp-clients`, `--udp-rate`).
    pub udp: crate::l4::admit::UdpLimits,
    /// Cancelled when the proxy shuts down.
    pub stop: CancellationToken,
}

/// The running workers.
pub struct Workers {
    ingresses: Vec<Weak<Ingress>>,
    sidecars: Vec<Weak<Sidecar>>,
    done: Vec<oneshot::Receiver<()>>,
}

/// What a worker reports once it serves.
struct Started {
    ingress: Weak<Ingress>,
    sidecar: Option<Weak<Sidecar>>,
}

impl Workers {
    /// Starts one worker per element of `sockets` (the first on this thread's runtime, the
    /// others on threads of their own) and waits until each serves; if one cannot start,
    /// stops the others and says why.
    pub async fn start(sockets: Vec<Sockets>, shared: Shared) -> anyhow::Result<Self> {
        let mut waiting = Vec::with_capacity(sockets.len());
        let mut done = Vec::with_capacity(sockets.len());
        for (index, sockets) in sockets.into_iter().enumerate() {
            let (started_tx, started_rx) = oneshot::channel();
            let (done_tx, done_rx) = oneshot::channel();
            // Boxed: one type for both ways it is driven (a task here, `block_on` on a
            // thread), so its code is generated once.
            let work: Pin<Box<dyn Future<Output = ()> + Send>> =
                Box::pin(run(index, sockets, shared.clone(), started_tx, done_tx));
            if index == 0 {
                tokio::spawn(work);
            } else {
                std::thread::Builder::new()
                    .name(format!("worker-{index}"))
                    .spawn(move || {
                        match tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                        {
                            Ok(runtime) => runtime.block_on(work),
                            Err(error) => tracing::error!(%error, index, "worker runtime"),
                        }
                    })
                    .context("cannot start a worker thread")?;
            }
            waiting.push(started_rx);
            done.push(done_rx);
        }
        let mut workers = Self {
            ingresses: Vec::new(),
            sidecars: Vec::new(),
            done,
        };
        for (index, started) in waiting.into_iter().enumerate() {
            let started = match started.await {
                Ok(Ok(started)) => started,
                Ok(Err(error)) => {
                    shared.stop.cancel();
                    return Err(error.context(format!("worker {index} cannot start")));
                }
                Err(_) => {
                    shared.stop.cancel();
                    anyhow::bail!("worker {index} ended before it served");
                }
            };
            workers.ingresses.push(started.ingress);
            workers.sidecars.extend(started.sidecar);
        }
        Ok(workers)
    }

    /// The instances every worker's ingress knows, for metrics.
    pub fn views(&self) -> impl Fn() -> Vec<ServiceView> + Send + Sync + 'static {
        let ingresses = self.ingresses.clone();
        move || {
            ingresses
                .iter()
                .filter_map(Weak::upgrade)
                .flat_map(|ingress| ingress.view())
                .collect()
        }
    }

    /// Probes answered by every worker's sidecar.
    pub fn probes_answered(&self) -> impl Fn() -> u64 + Send + Sync + 'static {
        let sidecars = self.sidecars.clone();
        move || {
            sidecars
                .iter()
                .filter_map(Weak::upgrade)
                .map(|sidecar| sidecar.probes_answered())
                .sum()
        }
    }

    /// Waits until every worker has ended (after the stop token: in-flight requests drained,
    /// connections closed).
    pub async fn finish(self) {
        for done in self.done {
            let _ = done.await;
        }
    }
}

/// One worker: sets up on its sockets, reports, serves until the stop token, drains.
async fn run(
    index: usize,
    sockets: Sockets,
    shared: Shared,
    started: oneshot::Sender<anyhow::Result<Started>>,
    _done: oneshot::Sender<()>,
) {
    let transport = |socket, role| {
        Transport::on_socket(socket, shared.keypair.clone(), shared.network_key, role)
    };
    // Only a sidecar's data-plane port accepts connections; an ingress's only opens them.
    let role = match shared.sidecar {
        Some(_) => EndpointRole::Serve,
        None => EndpointRole::DialOnly,
    };
    let set_up = (|| -> anyhow::Result<_> {
        let quic = Arc::new(transport(sockets.quic, role)?);
        let dial = match sockets.dial {
            Some(socket) => Arc::new(transport(socket, EndpointRole::DialOnly)?),
            None => Arc::clone(&quic),
        };
        let listener = sockets.http.map(listen).transpose()?;
        Ok((quic, dial, listener))
    })();
    let (quic, dial, listener) = match set_up {
        Ok(parts) => parts,
        Err(error) => {
            let _ = started.send(Err(error));
            return;
        }
    };
    let ingress = Ingress::new(
        shared.node.clone(),
        Arc::clone(&dial),
        shared.settings.clone(),
        shared.metrics.for_worker(index),
        Arc::clone(&shared.activity),
    );
    let datagrams = DatagramRouter::new();
    let sidecar = shared.sidecar.as_ref().map(|(service, template)| {
        let sidecar = template.for_worker();
        sidecar.count_upgrades_in(shared.metrics.upgrades.clone());
        sidecar.take_part_in_chains(HopRole {
            service: service.clone(),
            ingress: Arc::clone(&ingress),
            metrics: shared.tunnel_metrics.clone(),
            datagrams: Arc::clone(&datagrams),
        });
        sidecar
    });
    if let Some(sidecar) = &sidecar {
        tokio::spawn(accept_peers(Arc::clone(&quic), Arc::clone(sidecar)));
    }
    tokio::spawn(pace_timers(
        Arc::clone(&shared.activity),
        shared.stop.clone(),
    ));
    let _ = started.send(Ok(Started {
        ingress: Arc::downgrade(&ingress),
        sidecar: sidecar.as_ref().map(Arc::downgrade),
    }));

    let stop = shared.stop.clone();
    match (shared.program, listener) {
        (Program::Proxy, Some(listener)) => Arc::clone(&ingress).serve(listener, stop).await,
        (Program::L4Proxy, Some(listener)) => {
            ingress.run_cores(stop.clone());
            let front = L4Front::new(
                Arc::clone(&ingress),
                shared.tunnel_metrics.clone(),
                shared.listen_ip,
                shared.udp,
                datagrams,
                stop,
            );
            front.serve(listener).await;
        }
        (_, None) => {
            ingress.run_cores(stop.clone());
            stop.cancelled().await;
        }
    }
    // Requests in flight may finish (for a while); then every connection is closed.
    let give_up = tokio::time::Instant::now() + DRAIN;
    while shared.activity.in_flight() > 0 && tokio::time::Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for transport in [&quic, &dial] {
        transport.close();
        let _ = tokio::time::timeout(CLOSE, transport.wait_idle()).await;
    }
}

/// While requests arrive, a timer of the worker is always due within this: no request's timer
/// (a per-try timeout, at least perf.conf's `try-floor`, 10 ms by default) is armed earlier.
const PACE: Duration = Tuning::DEFAULT.try_floor;
/// A worker that has served nothing for this long paces at [`IDLE_PACE`] instead.
const BUSY_FOR: Duration = Duration::from_millis(200);
const IDLE_PACE: Duration = Duration::from_secs(1);

/// Keeps a timer due within [`PACE`] while requests arrive, so that arming a request's timer
/// never moves the runtime's next wake-up earlier: Tokio then wakes its own I/O driver (a
/// write to its eventfd, and an `epoll_wait` that returns at once) even when the timer is
/// armed on the runtime's own thread (tokio-rs/tokio#5207). The per-try timer of a request
/// did so on 0.56 requests in 1 at 1000 requests/s; this wakes the worker at most 100 times a
/// second while it serves, once a second while idle.
async fn pace_timers(activity: Arc<Activity>, stop: CancellationToken) {
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let busy = activity.idle(std::time::Instant::now()) < BUSY_FOR;
        tokio::select! {
            () = tokio::time::sleep(if busy { PACE } else { IDLE_PACE }) => {}
            () = &mut stopped => return,
        }
    }
}

/// Serves the requests of authenticated peers (service mode; an ingress's endpoint accepts
/// no connection at all).
async fn accept_peers(transport: Arc<Transport>, sidecar: Arc<Sidecar>) {
    while let Some(accepted) = transport.accept().await {
        match accepted {
            Ok((peer, connection)) => {
                tracing::debug!(%peer, "peer connected");
                tokio::spawn(Arc::clone(&sidecar).serve_connection(connection));
            }
            Err(error) => tracing::info!(%error, "data-plane connection refused"),
        }
    }
}
