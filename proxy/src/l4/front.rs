//! The `l4-proxy`'s front: its control API on 127.0.0.1:PORT, and one local listener per
//! chain that turns each TCP connection or UDP client address into a tunnel.
//!
//! | request | answer |
//! |---|---|
//! | `GET /<tcp\|udp>/<svc1>[/<svc2>...]` | 200 `127.0.0.1:<port>\n`: the chain's listener (TCP or UDP as its first token says), the same one for the same chain |
//! | a malformed spec, a query string, a looped chain | 400 with the reason |
//! | a service the lookup does not know | 404 naming it |
//! | the lookup cannot be asked | 503 |
//! | not GET | 405 |
//! | no listener could be bound | 500 |

use std::{
    collections::{HashMap, hash_map::Entry},
    convert::Infallible,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    net::{TcpListener, TcpStream, UdpSocket},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;

use super::{
    Direction, OpenTunnel, TunnelMetrics,
    admit::{TokenBucket, UdpLimits},
    carry::{Counts, Sink, Source, direction, stream_ends},
    chain::{Chain, Protocol},
    datagrams::DatagramRouter,
};
use crate::{
    framing::MAX_DATAGRAM_BYTES,
    ingress::{Ingress, ResponseBody, plain},
};

/// Datagrams of one UDP client that wait while its tunnel is set up (or sent on).
pub const CLIENT_QUEUE: usize = 256;

/// The control API and the chains' listeners.
pub struct L4Front {
    ingress: Arc<Ingress>,
    metrics: TunnelMetrics,
    /// Where chain listeners bind (the control API's address).
    ip: IpAddr,
    udp: UdpLimits,
    datagrams: Arc<DatagramRouter>,
    chains: tokio::sync::Mutex<HashMap<Chain, SocketAddr>>,
    shutdown: CancellationToken,
}

/// A client's tunnel, open: its ends and counters.
struct ClientTunnel {
    _open: OpenTunnel,
    forward: Counts,
    backward: Counts,
    up: Sink,
    down: Source,
}

/// One chain as its listener's tunnels need it.
struct Listening {
    spec: String,
    encoded: Bytes,
    first: String,
}

impl L4Front {
    /// A front opening tunnels through `ingress`, binding chain listeners on `ip` (the
    /// control API's), holding UDP clients within `udp`'s limits, routing tunnels' QUIC
    /// datagrams with `datagrams`, until `shutdown` is cancelled.
    pub fn new(
        ingress: Arc<Ingress>,
        metrics: TunnelMetrics,
        ip: IpAddr,
        udp: UdpLimits,
        datagrams: Arc<DatagramRouter>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            ingress,
            metrics,
            ip,
            udp,
            datagrams,
            chains: Default::default(),
            shutdown,
        })
    }

    /// Serves the control API on `listener` until shutdown.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        tracing::warn!(%error, "control API: accept failed");
                        continue;
                    }
                },
                () = self.shutdown.cancelled() => return,
            };
            let this = Arc::clone(&self);
            tokio::spawn(async move {
                let service = service_fn(|request| {
                    let this = Arc::clone(&this);
                    async move { Ok::<_, Infallible>(this.control(request).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    /// Answers one control request (see the module doc).
    pub async fn control(self: &Arc<Self>, request: Request<Incoming>) -> Response<ResponseBody> {
        if request.method() != Method::GET {
            return plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET /<tcp|udp>/<service>...".to_owned(),
            );
        }
        let spec = request.uri().path_and_query().map_or("/", |p| p.as_str());
        let chain = match Chain::parse(spec) {
            Ok(chain) => chain,
            Err(error) => return plain(StatusCode::BAD_REQUEST, error.to_string()),
        };
        for hop in chain.hops() {
            if let Err(error) = self.ingress.resolve(&hop.service).await {
                return error.into_response();
            }
        }
        match self.listen(chain).await {
            Ok(addr) => plain(StatusCode::OK, addr.to_string()),
            Err(error) => plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot open a listener for the chain: {error}"),
            ),
        }
    }

    /// The listener of `chain`, opened if it is new.
    async fn listen(self: &Arc<Self>, chain: Chain) -> io::Result<SocketAddr> {
        let mut chains = self.chains.lock().await;
        if let Some(addr) = chains.get(&chain) {
            return Ok(*addr);
        }
        let listening = Arc::new(Listening {
            spec: chain.to_string(),
            encoded: chain.to_bytes(),
            first: chain.hops()[0].service.clone(),
        });
        let addr = match chain.client_protocol() {
            Protocol::Tcp => {
                let listener = TcpListener::bind((self.ip, 0)).await?;
                let addr = listener.local_addr()?;
                tokio::spawn(Arc::clone(self).accept_tcp(listener, listening));
                addr
            }
            Protocol::Udp => {
                let socket = UdpSocket::bind((self.ip, 0)).await?;
                crate::transport::size_socket_buffers(&socket);
                let addr = socket.local_addr()?;
                tokio::spawn(Arc::clone(self).receive_udp(Arc::new(socket), listening));
                addr
            }
        };
        tracing::info!(chain = %chain, %addr, "chain listening");
        chains.insert(chain, addr);
        Ok(addr)
    }

    async fn accept_tcp(self: Arc<Self>, listener: TcpListener, chain: Arc<Listening>) {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        tracing::warn!(chain = %chain.spec, %error, "accept failed");
                        continue;
                    }
                },
                () = self.shutdown.cancelled() => return,
            };
            tokio::spawn(Arc::clone(&self).tcp_tunnel(stream, Arc::clone(&chain)));
        }
    }

    /// One TCP connection's tunnel: set up, then both ways until both end.
    async fn tcp_tunnel(self: Arc<Self>, stream: TcpStream, chain: Arc<Listening>) {
        let _ = stream.set_nodelay(true);
        let Some(mut tunnel) = self.open(&chain).await else {
            // A reset, not a clean end: the client must not take it for an empty answer.
            #[allow(deprecated)]
            let _ = stream.set_linger(Some(Duration::ZERO));
            return;
        };
        let (read, write) = stream.into_split();
        let (mut from_client, mut to_client) = (Source::Tcp(read), Sink::Tcp(write));
        let (up, down) = (&mut tunnel.up, &mut tunnel.down);
        let (forward, backward) = (&tunnel.forward, &tunnel.backward);
        let (never, broken) = (CancellationToken::new(), CancellationToken::new());
        let (a, b) = tokio::join!(
            direction(&mut from_client, up, forward, || {}, &never, &broken),
            direction(down, &mut to_client, backward, || {}, &never, &broken),
        );
        if let Some(error) = a.err().or(b.err()) {
            self.metrics.failed(&chain.spec, "client", "broken");
            tracing::debug!(chain = %chain.spec, %error, "tunnel broke");
        }
    }

    /// A client's tunnel through `chain`, set up and counted open; `None` (counted, logged)
    /// if it could not be.
    async fn open(&self, chain: &Listening) -> Option<ClientTunnel> {
        let tunnel = match self.ingress.open_tunnel(&chain.first, &chain.encoded).await {
            Ok(tunnel) => tunnel,
            Err(error) => {
                self.metrics.failed(&chain.spec, "client", "set_up");
                tracing::warn!(chain = %chain.spec, %error, "tunnel set-up failed");
                return None;
            }
        };
        let (up, down) = stream_ends(
            &self.datagrams,
            &tunnel.connection,
            tunnel.send,
            tunnel.recv,
            tunnel.rest,
            self.metrics.receive_queue_full(&chain.spec, "client"),
        );
        Some(ClientTunnel {
            _open: self.metrics.opened(&chain.spec, "client"),
            forward: self
                .metrics
                .counts(&chain.spec, "client", Direction::Forward),
            backward: self
                .metrics
                .counts(&chain.spec, "client", Direction::Backward),
            up,
            down,
        })
    }

    /// Reads the chain's UDP socket: each client address gets a tunnel of its own (set up in
    /// its own task) and a queue; a client quiet for the idle timeout is forgotten. What a
    /// source may hold and send is bounded as [`super::admit`] says.
    async fn receive_udp(self: Arc<Self>, socket: Arc<UdpSocket>, chain: Arc<Listening>) {
        struct Client {
            id: u64,
            queue: mpsc::Sender<Bytes>,
            last: Arc<AtomicU64>,
            bucket: TokenBucket,
        }
        let began = Instant::now();
        let now_ms = move || began.elapsed().as_millis() as u64;
        let mut clients: HashMap<SocketAddr, Client> = HashMap::new();
        let (ended, mut ends) = mpsc::unbounded_channel::<(SocketAddr, u64)>();
        let mut sweep = tokio::time::interval((self.udp.idle / 4).max(Duration::from_millis(50)));
        let idle_ms = self.udp.idle.as_millis() as u64;
        let (rate, burst) = (self.udp.rate, self.udp.burst());
        let mut next_id = 0;
        let mut buffer = BytesMut::new();
        loop {
            buffer.reserve(MAX_DATAGRAM_BYTES);
            tokio::select! {
                received = socket.recv_buf_from(&mut buffer) => {
                    let from = match received {
                        Ok((_, from)) => from,
                        Err(error) => {
                            tracing::debug!(chain = %chain.spec, %error, "UDP receive failed");
                            continue;
                        }
                    };
                    let datagram = buffer.split().freeze();
                    let now = now_ms();
                    let held = clients.len();
                    let client = match clients.entry(from) {
                        Entry::Occupied(known) => known.into_mut(),
                        Entry::Vacant(_) if held >= self.udp.max_clients => {
                            self.metrics.udp_limit_hit(&chain.spec, "too_many_clients");
                            continue;
                        }
                        Entry::Vacant(new) => {
                            next_id += 1;
                            let (queue, queued) = mpsc::channel(CLIENT_QUEUE);
                            let last = Arc::new(AtomicU64::new(now));
                            tokio::spawn(Arc::clone(&self).udp_tunnel(
                                Arc::clone(&socket),
                                from,
                                queued,
                                Arc::clone(&chain),
                                {
                                    let last = Arc::clone(&last);
                                    move || last.store(now_ms(), Ordering::Relaxed)
                                },
                                {
                                    let ended = ended.clone();
                                    let id = next_id;
                                    move || { let _ = ended.send((from, id)); }
                                },
                            ));
                            new.insert(Client { id: next_id, queue, last, bucket: TokenBucket::new(now, burst) })
                        }
                    };
                    client.last.store(now, Ordering::Relaxed);
                    if !client.bucket.admit(now, rate, burst) {
                        self.metrics.udp_limit_hit(&chain.spec, "rate_limited");
                        continue;
                    }
                    if client.queue.try_send(datagram).is_err() {
                        self.metrics.queue_full(&chain.spec);
                    }
                }
                Some((from, id)) = ends.recv() => {
                    if clients.get(&from).is_some_and(|client| client.id == id) {
                        clients.remove(&from);
                    }
                }
                _ = sweep.tick() => {
                    let now = now_ms();
                    // Dropping a client's queue ends its tunnel.
                    clients.retain(|_, client| now.saturating_sub(client.last.load(Ordering::Relaxed)) < idle_ms);
                }
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    /// One UDP client's tunnel: set up while its datagrams queue, then both ways until its
    /// queue is dropped (idle) or the tunnel ends.
    async fn udp_tunnel(
        self: Arc<Self>,
        socket: Arc<UdpSocket>,
        client: SocketAddr,
        queued: mpsc::Receiver<Bytes>,
        chain: Arc<Listening>,
        touched: impl Fn() + Send,
        ended: impl FnOnce() + Send,
    ) {
        let Some(mut tunnel) = self.open(&chain).await else {
            ended();
            return;
        };
        let mut from_client = Source::Datagrams(queued);
        let mut to_client = Sink::UdpTo(socket, client);
        let (up, down) = (&mut tunnel.up, &mut tunnel.down);
        let (forward, backward) = (&tunnel.forward, &tunnel.backward);
        let (never, broken, idle) = (
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
        );
        let up_until_idle = async {
            let result = direction(&mut from_client, up, forward, &touched, &never, &broken).await;
            idle.cancel();
            result
        };
        let (a, b) = tokio::join!(
            up_until_idle,
            direction(down, &mut to_client, backward, &touched, &idle, &broken),
        );
        if let Some(error) = a.err().or(b.err()) {
            self.metrics.failed(&chain.spec, "client", "broken");
            tracing::debug!(chain = %chain.spec, %client, %error, "tunnel broke");
        }
        ended();
    }
}
