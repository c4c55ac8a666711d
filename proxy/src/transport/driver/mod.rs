//! QUIC driven by one task per endpoint, over quinn-proto: the data plane's transport
//! (issue 13; docs/quic-driver.md has the design, what was measured and what is next).
//!
//! quinn drives each connection from a task of its own and the endpoint from another, so a
//! request that arrives on the socket is handed from the endpoint's task to the connection's
//! and then to the stream's reader: two wake-ups and polls before anyone reads it, and every
//! write from a request task wakes the connection's task to send it. Here one task, the
//! *driver*, owns the socket, the `quinn_proto::Endpoint` and every `quinn_proto::Connection`:
//!
//! - **State.** All of it sits in one [`State`] behind one mutex. The lock is held only for
//!   calls into quinn-proto, never across an await; only the tasks of one worker take it.
//! - **Handles call quinn-proto directly.** A [`SendStream`] write locks the state, writes
//!   into the stream and marks the connection *dirty*; it wakes the driver only if the driver
//!   is not already due to run ([`State::mark`]). A [`RecvStream`] read takes what quinn-proto
//!   holds for it or leaves its waker for the driver. Waits on a connection as a whole (a
//!   stream to open or accept, a datagram, its end) are `tokio::sync::Notify`s, which any
//!   number of tasks may wait on and give up.
//! - **The driver** ([`Driver`]), each time it runs: receives up to [`RECV_SLOTS`] datagrams
//!   per call (GRO batches) and feeds them to the endpoint and on to their connections; runs
//!   the timers that are due; then, for each dirty connection, exchanges its events with the
//!   endpoint, wakes the handles its events concern, and sends what it has to send (up to
//!   [`MAX_TRANSMIT_DATAGRAMS`] datagrams per turn, GSO batches through quinn-udp). One
//!   `Sleep` serves every connection: the deadlines sit in a `BTreeSet`, earliest first.
//! - **Lifetimes.** A connection lives while any handle to it (a [`Connection`], a stream, a
//!   [`Connecting`]) does; when the last goes, it closes with code 0, as quinn's do. Its entry
//!   stays until quinn-proto has drained it *and* no handle is left, so a handle never
//!   reaches another connection that took its place. The driver ends when every [`Endpoint`]
//!   handle and every connection are gone.
//!
//! Names and error types are quinn's (`open_bi`, `write_all_chunks`, `quinn::WriteError`, ..),
//! so code written against quinn moves over by its imports.

mod connection;
mod streams;
#[cfg(test)]
mod tests;

pub use connection::{Connecting, Connection};
pub use streams::{RecvStream, SendStream};

use std::{
    collections::{BTreeSet, VecDeque},
    future::Future,
    io::{self, IoSliceMut},
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, Waker},
    time::Instant,
};

use bytes::BytesMut;
use quinn::{
    AsyncUdpSocket, UdpPoller,
    udp::{EcnCodepoint as UdpEcn, RecvMeta},
};
use quinn_proto::{self as proto, ConnectionHandle, DatagramEvent};
use rustc_hash::FxHashMap;
use slab::Slab;

/// Datagrams (or GRO batches) taken from the socket per receive call, each into a slot of
/// [`SLOT_BYTES`]: 512 KiB of receive buffer per endpoint, where quinn reserves 134 MiB.
const RECV_SLOTS: usize = 8;
/// One slot: the largest UDP payload, or a GRO batch, which Linux keeps within 64 KiB.
const SLOT_BYTES: usize = 1 << 16;
/// Receive calls per turn of the driver before it lets other tasks run.
const RECV_CALLS_PER_TURN: usize = 16;
/// Datagrams one connection sends per turn before the next connection's turn (quinn's
/// figure); a connection with more is visited again in the next turn.
const MAX_TRANSMIT_DATAGRAMS: usize = 20;
/// Datagrams per GSO batch at most (quinn's figure).
const MAX_TRANSMIT_SEGMENTS: usize = 10;
/// Connections processed per turn before the driver yields.
const CONNECTIONS_PER_TURN: usize = 64;

/// A QUIC endpoint whose connections one driver task runs (see the module doc). Cheap to
/// clone; the driver runs until every clone and every connection is gone.
pub struct Endpoint {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the driver and the handles share (see the module doc).
pub(crate) struct State {
    endpoint: proto::Endpoint,
    socket: Arc<dyn AsyncUdpSocket>,
    /// Ready when the socket can take a send again after one would have blocked.
    poller: Pin<Box<dyn UdpPoller>>,
    server_config: Option<Arc<proto::ServerConfig>>,
    client_config: proto::ClientConfig,
    conns: Slab<connection::Conn>,
    /// quinn-proto's handle of each connection it has not drained, to our key.
    keys: FxHashMap<ConnectionHandle, usize>,
    /// Connections with something to do (each listed once; see `Conn::dirty`).
    dirty: VecDeque<usize>,
    /// Every connection's next timeout, earliest first.
    deadlines: BTreeSet<(Instant, usize)>,
    timer: Pin<Box<tokio::time::Sleep>>,
    timer_at: Option<Instant>,
    /// Inbound connections handshaking, not yet taken by [`Endpoint::accept`].
    incoming: VecDeque<usize>,
    acceptors: Vec<Waker>,
    /// Waiting for every connection to be drained ([`Endpoint::wait_idle`]).
    idle: Vec<Waker>,
    /// A transmit the socket would not take; sent before anything else.
    blocked: Option<(usize, proto::Transmit)>,
    send_buf: Vec<u8>,
    response_buf: Vec<u8>,
    driver: Option<Waker>,
    /// The driver is due to run: marking more work need not wake it again.
    scheduled: bool,
    /// [`Endpoint`] handles alive.
    endpoints: usize,
    /// [`Endpoint::close`] was called: nothing new is accepted.
    closed: bool,
    next_stable_id: usize,
}

impl State {
    /// Notes that connection `key` has something for the driver to do, and wakes the driver
    /// unless it is due to run already.
    fn mark(&mut self, key: usize) {
        if let Some(conn) = self.conns.get_mut(key)
            && !conn.dirty
        {
            conn.dirty = true;
            self.dirty.push_back(key);
        }
        self.wake_driver();
    }

    fn wake_driver(&mut self) {
        if !self.scheduled {
            self.scheduled = true;
            if let Some(driver) = &self.driver {
                driver.wake_by_ref();
            }
        }
    }

    /// Adds a connection quinn-proto made (dialled or accepted), held by `refs` handles.
    fn insert(&mut self, handle: ConnectionHandle, inner: proto::Connection, refs: usize) -> usize {
        let stable_id = self.next_stable_id;
        self.next_stable_id += 1;
        let key = self
            .conns
            .insert(connection::Conn::new(handle, inner, refs, stable_id));
        self.keys.insert(handle, key);
        self.mark(key);
        key
    }

    /// One handle to connection `key` fewer: the last closes it (code 0) and, once it is
    /// drained too, frees its entry.
    fn release(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        conn.refs -= 1;
        if conn.refs > 0 {
            return;
        }
        if conn.drained {
            self.remove(key);
        } else if conn.error.is_none() {
            let now = Instant::now();
            conn.close(now, 0u32.into(), bytes::Bytes::new());
            self.mark(key);
        }
    }

    fn remove(&mut self, key: usize) {
        let conn = self.conns.remove(key);
        if let Some(at) = conn.deadline {
            self.deadlines.remove(&(at, key));
        }
        self.dirty.retain(|k| *k != key);
        if self.conns.is_empty() {
            // With no endpoint handle left either, the driver ends.
            self.wake_driver();
        }
    }

    /// Waits for the socket to take sends again, if one would have blocked; sends the
    /// transmit that was refused. Ready(false) while the socket is still full.
    fn unblock(&mut self, cx: &mut Context) -> bool {
        let Some((key, transmit)) = self.blocked.take() else {
            return true;
        };
        loop {
            match self.poller.as_mut().poll_writable(cx) {
                Poll::Pending => {
                    self.blocked = Some((key, transmit));
                    return false;
                }
                Poll::Ready(Err(error)) => {
                    // The transmit is lost (QUIC recovers it); the connection goes on.
                    tracing::warn!(%error, "QUIC socket: cannot wait for write space");
                    self.mark(key);
                    return true;
                }
                Poll::Ready(Ok(())) => {}
            }
            if !self.send(&transmit, &self.send_buf) {
                continue;
            }
            self.mark(key);
            return true;
        }
    }

    /// Everything connection `key` has to do now: the events it owes the endpoint and the
    /// endpoint's answers, its application events (waking the handles they concern), its
    /// datagrams (up to [`MAX_TRANSMIT_DATAGRAMS`]), its timer. False when the socket is full.
    fn process(&mut self, key: usize, now: Instant, cx: &mut Context) -> bool {
        let Some(conn) = self.conns.get_mut(key) else {
            return true;
        };
        conn.dirty = false;
        if conn.drained {
            return true;
        }
        // Timeouts were handled before; events the endpoint answers may add more to send.
        let max_datagrams = self
            .socket
            .max_transmit_segments()
            .clamp(1, MAX_TRANSMIT_SEGMENTS);
        let mut sent = 0;
        loop {
            self.exchange_endpoint_events(key);
            let conn = &mut self.conns[key];
            conn.forward_app_events();
            if conn.drained {
                break;
            }
            self.send_buf.clear();
            let Some(transmit) = conn
                .inner
                .poll_transmit(now, max_datagrams, &mut self.send_buf)
            else {
                break;
            };
            sent += transmit
                .size
                .div_ceil(transmit.segment_size.unwrap_or(transmit.size));
            if !self.send(&transmit, &self.send_buf) {
                self.blocked = Some((key, transmit));
                if !self.unblock(cx) {
                    return false;
                }
            }
            if sent >= MAX_TRANSMIT_DATAGRAMS {
                self.mark(key);
                break;
            }
        }
        self.exchange_endpoint_events(key);
        self.rearm(key);
        if self.conns[key].drained && self.conns[key].refs == 0 {
            self.remove(key);
        }
        true
    }

    /// Hands connection `key`'s events to the endpoint and the endpoint's answers back; a
    /// drained connection leaves the endpoint's books (and ours once no handle is left).
    fn exchange_endpoint_events(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        while let Some(event) = conn.inner.poll_endpoint_events() {
            let drained = event.is_drained();
            if let Some(answer) = self.endpoint.handle_event(conn.handle, event) {
                conn.inner.handle_event(answer);
            }
            if drained {
                conn.drained = true;
                self.keys.remove(&conn.handle);
                // The reason it ended is among its last application events.
                conn.forward_app_events();
                conn.terminate(proto::ConnectionError::LocallyClosed);
                if self.keys.is_empty() {
                    self.idle.drain(..).for_each(Waker::wake);
                }
            }
        }
    }

    /// Keeps connection `key`'s entry in the deadlines current.
    fn rearm(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        let next = if conn.drained {
            None
        } else {
            conn.inner.poll_timeout()
        };
        if next != conn.deadline {
            if let Some(at) = conn.deadline {
                self.deadlines.remove(&(at, key));
            }
            if let Some(at) = next {
                self.deadlines.insert((at, key));
            }
            conn.deadline = next;
        }
    }

    /// Feeds one received datagram (or GRO batch) to the endpoint.
    fn receive(&mut self, now: Instant, meta: &RecvMeta, data: &[u8]) {
        let mut data = BytesMut::from(data);
        while !data.is_empty() {
            let datagram = data.split_to(meta.stride.min(data.len()).max(1));
            self.response_buf.clear();
            let event = self.endpoint.handle(
                now,
                meta.addr,
                meta.dst_ip,
                meta.ecn.map(proto_ecn),
                datagram,
                &mut self.response_buf,
            );
            match event {
                Some(DatagramEvent::ConnectionEvent(handle, event)) => {
                    if let Some(&key) = self.keys.get(&handle) {
                        self.conns[key].inner.handle_event(event);
                        self.mark(key);
                    }
                }
                Some(DatagramEvent::NewConnection(incoming)) => self.incoming(now, incoming),
                Some(DatagramEvent::Response(transmit)) => self.respond(&transmit),
                None => {}
            }
        }
    }

    /// A connection attempt from outside: accepted and queued for [`Endpoint::accept`],
    /// unless this endpoint serves nothing or is closing.
    fn incoming(&mut self, now: Instant, incoming: proto::Incoming) {
        self.response_buf.clear();
        if self.closed || self.server_config.is_none() {
            let transmit = self.endpoint.refuse(incoming, &mut self.response_buf);
            self.respond(&transmit);
            return;
        }
        match self
            .endpoint
            .accept(incoming, now, &mut self.response_buf, None)
        {
            Ok((handle, inner)) => {
                // The queue holds the one handle until `accept` hands it out.
                let key = self.insert(handle, inner, 1);
                self.incoming.push_back(key);
                self.acceptors.drain(..).for_each(Waker::wake);
            }
            Err(error) => {
                tracing::debug!(cause = %error.cause, "QUIC: an inbound connection failed");
                if let Some(transmit) = error.response {
                    self.respond(&transmit);
                }
            }
        }
    }

    /// Sends a stateless answer of the endpoint's, if the socket has room (else it is lost,
    /// as a datagram may be).
    fn respond(&self, transmit: &proto::Transmit) {
        self.send(transmit, &self.response_buf);
    }

    /// One send of `transmit`, whose bytes start `buf`; false if the socket is full. Any
    /// other failure counts as sent: as quinn does, a send the network refuses is a lost
    /// datagram, which QUIC recovers from.
    fn send(&self, transmit: &proto::Transmit, buf: &[u8]) -> bool {
        match self
            .socket
            .try_send(&udp_transmit(transmit, &buf[..transmit.size]))
        {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(error) => {
                tracing::debug!(%error, "QUIC socket: a send failed");
                true
            }
            Ok(()) => true,
        }
    }
}

fn proto_ecn(ecn: UdpEcn) -> proto::EcnCodepoint {
    match ecn {
        UdpEcn::Ect0 => proto::EcnCodepoint::Ect0,
        UdpEcn::Ect1 => proto::EcnCodepoint::Ect1,
        UdpEcn::Ce => proto::EcnCodepoint::Ce,
    }
}

fn udp_transmit<'a>(transmit: &proto::Transmit, contents: &'a [u8]) -> quinn::udp::Transmit<'a> {
    quinn::udp::Transmit {
        destination: transmit.destination,
        ecn: transmit.ecn.map(|ecn| match ecn {
            proto::EcnCodepoint::Ect0 => UdpEcn::Ect0,
            proto::EcnCodepoint::Ect1 => UdpEcn::Ect1,
            proto::EcnCodepoint::Ce => UdpEcn::Ce,
        }),
        contents,
        segment_size: transmit.segment_size,
        src_ip: transmit.src_ip,
    }
}

impl Endpoint {
    /// An endpoint on `socket`, accepting connections with `server` if given and dialling
    /// with `client`; spawns its driver on the current Tokio runtime.
    pub fn new(
        config: proto::EndpointConfig,
        server: Option<proto::ServerConfig>,
        client: proto::ClientConfig,
        socket: Arc<dyn AsyncUdpSocket>,
    ) -> Self {
        let server_config = server.map(Arc::new);
        let endpoint = proto::Endpoint::new(
            Arc::new(config),
            server_config.clone(),
            !socket.may_fragment(),
            None,
        );
        let poller = Arc::clone(&socket).create_io_poller();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                endpoint,
                socket,
                poller,
                server_config,
                client_config: client,
                conns: Slab::new(),
                keys: FxHashMap::default(),
                dirty: VecDeque::new(),
                deadlines: BTreeSet::new(),
                timer: Box::pin(tokio::time::sleep_until(tokio::time::Instant::now())),
                timer_at: None,
                incoming: VecDeque::new(),
                acceptors: Vec::new(),
                idle: Vec::new(),
                blocked: None,
                send_buf: Vec::new(),
                response_buf: Vec::new(),
                driver: None,
                scheduled: false,
                endpoints: 1,
                closed: false,
                next_stable_id: 0,
            }),
        });
        tokio::spawn(Driver {
            shared: Arc::clone(&shared),
            buffer: vec![0; RECV_SLOTS * SLOT_BYTES].into_boxed_slice(),
        });
        Self { shared }
    }

    /// Starts a connection to `addr`, presenting `server_name` to its TLS; quinn-proto refuses
    /// an unusable address, or when it has no connection identifiers left.
    pub fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<Connecting, proto::ConnectError> {
        let mut state = self.shared.lock();
        let now = Instant::now();
        let config = state.client_config.clone();
        let (handle, inner) = state.endpoint.connect(now, config, addr, server_name)?;
        let key = state.insert(handle, inner, 1);
        Ok(Connecting::new(Connection::from_key(
            &self.shared,
            &state,
            key,
        )))
    }

    /// The next inbound connection, handshaking; `None` once the endpoint is closed.
    pub async fn accept(&self) -> Option<Connecting> {
        std::future::poll_fn(|cx| {
            let mut state = self.shared.lock();
            if let Some(key) = state.incoming.pop_front() {
                // Takes over the queue's handle.
                return Poll::Ready(Some(Connecting::new(Connection::from_key(
                    &self.shared,
                    &state,
                    key,
                ))));
            }
            if state.closed {
                return Poll::Ready(None);
            }
            push_waker(&mut state.acceptors, cx.waker());
            Poll::Pending
        })
        .await
    }

    /// The address of the endpoint's socket.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.shared.lock().socket.local_addr()
    }

    /// Closes every connection with `code` and `reason`, accepts nothing more.
    pub fn close(&self, code: proto::VarInt, reason: &[u8]) {
        let mut state = self.shared.lock();
        state.closed = true;
        state.acceptors.drain(..).for_each(Waker::wake);
        let now = Instant::now();
        let reason = bytes::Bytes::copy_from_slice(reason);
        let keys: Vec<usize> = state.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            state.conns[key].close(now, code, reason.clone());
            state.mark(key);
        }
    }

    /// The driver's state, to see that it goes when everything else has (tests).
    #[cfg(test)]
    fn state_weak(&self) -> std::sync::Weak<Shared> {
        Arc::downgrade(&self.shared)
    }

    /// Resolves once every connection has been drained.
    pub async fn wait_idle(&self) {
        std::future::poll_fn(|cx| {
            let mut state = self.shared.lock();
            if state.keys.is_empty() {
                return Poll::Ready(());
            }
            push_waker(&mut state.idle, cx.waker());
            Poll::Pending
        })
        .await
    }
}

impl Clone for Endpoint {
    fn clone(&self) -> Self {
        self.shared.lock().endpoints += 1;
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.endpoints -= 1;
        if state.endpoints == 0 {
            // Nobody will accept inbound connections: those queued close, and new ones are
            // refused. The driver ends once the other connections have.
            state.closed = true;
            while let Some(key) = state.incoming.pop_front() {
                state.release(key);
            }
            state.wake_driver();
        }
    }
}

/// Adds `waker` to `wakers` unless one there wakes the same task.
fn push_waker(wakers: &mut Vec<Waker>, waker: &Waker) {
    if !wakers.iter().any(|w| w.will_wake(waker)) {
        wakers.push(waker.clone());
    }
}

/// The endpoint's task (see the module doc): ends when no [`Endpoint`] handle and no
/// connection is left.
struct Driver {
    shared: Arc<Shared>,
    /// [`RECV_SLOTS`] slots of [`SLOT_BYTES`].
    buffer: Box<[u8]>,
}

impl Future for Driver {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context) -> Poll<()> {
        let this = self.get_mut();
        let mut guard = this.shared.lock();
        let state = &mut *guard;
        if !state
            .driver
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            state.driver = Some(cx.waker().clone());
        }
        // Work marked while this turn runs is done in it: no need to be woken for it.
        state.scheduled = true;
        let mut more = false;

        // 1. What the socket has.
        let mut meta = [RecvMeta::default(); RECV_SLOTS];
        for call in 0.. {
            if call == RECV_CALLS_PER_TURN {
                more = true;
                break;
            }
            let mut slots: [IoSliceMut; RECV_SLOTS] = {
                let mut chunks = this.buffer.chunks_exact_mut(SLOT_BYTES);
                std::array::from_fn(|_| IoSliceMut::new(chunks.next().expect("RECV_SLOTS slots")))
            };
            match state.socket.poll_recv(cx, &mut slots, &mut meta) {
                Poll::Pending => break,
                Poll::Ready(Err(error)) => {
                    // ICMP errors and the like surface here; the socket itself goes on.
                    tracing::debug!(%error, "QUIC socket: a receive failed");
                    continue;
                }
                Poll::Ready(Ok(count)) => {
                    let now = Instant::now();
                    for (meta, slot) in meta
                        .iter()
                        .zip(this.buffer.chunks_exact(SLOT_BYTES))
                        .take(count)
                    {
                        state.receive(now, meta, &slot[..meta.len]);
                    }
                }
            }
        }

        // 2. Timers due.
        let now = Instant::now();
        while let Some(&(at, key)) = state.deadlines.first() {
            if at > now {
                break;
            }
            state.deadlines.pop_first();
            let conn = &mut state.conns[key];
            conn.deadline = None;
            conn.inner.handle_timeout(now);
            state.mark(key);
        }

        // 3. Connections with something to do, after a send the socket refused.
        if state.unblock(cx) {
            for _ in 0..CONNECTIONS_PER_TURN {
                let Some(key) = state.dirty.pop_front() else {
                    break;
                };
                if !state.process(key, now, cx) {
                    break;
                }
            }
        }
        if !state.dirty.is_empty() && state.blocked.is_none() {
            more = true;
        }

        // 4. The next timeout.
        if let Some(&(at, _)) = state.deadlines.first() {
            if state.timer_at != Some(at) {
                state.timer.as_mut().reset(at.into());
                state.timer_at = Some(at);
            }
            if state.timer.as_mut().poll(cx).is_ready() {
                more = true;
            }
        } else {
            state.timer_at = None;
        }

        if state.endpoints == 0 && state.conns.is_empty() {
            return Poll::Ready(());
        }
        if more {
            cx.waker().wake_by_ref();
        } else {
            state.scheduled = false;
        }
        Poll::Pending
    }
}
