//! A userspace UDP relay that delays every datagram: an emulated long link in front of a QUIC
//! endpoint, on loopback, with no privileges (where `tc netem` would need them and a network
//! namespace). Delay and jitter can be changed while it runs.
//!
//! It runs on its own threads with blocking sockets and `nanosleep`, not on the async runtime:
//! the runtime's timer rounds every sleep up to the next millisecond, which would turn a
//! 0.5 ms one-way delay into anything up to 1.5 ms.

use std::{
    collections::HashMap,
    io,
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{Receiver, Sender, channel},
    },
    thread,
    time::{Duration, Instant},
};

/// How often blocked threads look whether the relay was dropped.
pub(crate) const POLL: Duration = Duration::from_millis(100);

/// The delay each datagram gets, one way: `one_way` plus a uniform random part below
/// `jitter`.
pub(crate) struct Shape {
    one_way_micros: AtomicU64,
    jitter_micros: AtomicU64,
    pub(crate) stopped: AtomicBool,
}

impl Shape {
    pub(crate) fn new(one_way: Duration) -> Arc<Self> {
        Arc::new(Self {
            one_way_micros: AtomicU64::new(one_way.as_micros() as u64),
            jitter_micros: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
        })
    }

    fn delay(&self, random: &mut u64) -> Duration {
        let jitter = self.jitter_micros.load(Ordering::Relaxed);
        // xorshift64: uniform enough for jitter, and no dependency.
        *random ^= *random << 13;
        *random ^= *random >> 7;
        *random ^= *random << 17;
        let extra = if jitter == 0 { 0 } else { *random % jitter };
        Duration::from_micros(self.one_way_micros.load(Ordering::Relaxed) + extra)
    }
}

/// Where a delayed datagram leaves: a UDP socket towards an address, or a TUN device.
pub(crate) trait Egress: Clone + Send + 'static {
    fn send(&self, datagram: &[u8]);
}

/// A UDP socket and the address its datagrams go to.
#[derive(Clone)]
struct UdpTo(Arc<UdpSocket>, SocketAddr);

impl Egress for UdpTo {
    fn send(&self, datagram: &[u8]) {
        let _ = self.0.send_to(datagram, self.1);
    }
}

/// A datagram on its way: when it is due and where it leaves.
struct InFlight<E> {
    due: Instant,
    datagram: Vec<u8>,
    out: E,
}

/// One direction of a link: datagrams leave in the order they came, each once its delay has
/// passed (a late one holds back the ones behind it, as on a single path).
pub(crate) struct DelayLine<E> {
    queue: Sender<InFlight<E>>,
    shape: Arc<Shape>,
    random: u64,
    last_due: Instant,
}

impl<E: Egress> DelayLine<E> {
    pub(crate) fn start(shape: Arc<Shape>, seed: u64) -> Self {
        let (queue, due) = channel();
        thread::spawn(move || deliver(due));
        Self {
            queue,
            shape,
            random: seed | 1,
            last_due: Instant::now(),
        }
    }

    pub(crate) fn push(&mut self, arrived: Instant, datagram: Vec<u8>, out: &E) {
        let due = (arrived + self.shape.delay(&mut self.random)).max(self.last_due);
        self.last_due = due;
        let _ = self.queue.send(InFlight {
            due,
            datagram,
            out: out.clone(),
        });
    }
}

/// Sends each datagram when it is due; ends when the line's sender is gone.
fn deliver<E: Egress>(due: Receiver<InFlight<E>>) {
    while let Ok(datagram) = due.recv() {
        if let Some(wait) = datagram.due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        datagram.out.send(&datagram.datagram);
    }
}

/// A relay in front of `target`: datagrams to [`UdpDelayRelay::addr`] reach the target, and
/// its answers come back, each delayed. A round trip through it takes twice the one-way delay
/// longer. Its threads end soon after it is dropped.
pub struct UdpDelayRelay {
    /// Where clients send instead of the target: a free UDP port on the target's IP.
    pub addr: SocketAddr,
    shape: Arc<Shape>,
}

impl UdpDelayRelay {
    /// Starts a relay in front of `target` that delays every datagram by `one_way` each way,
    /// with no jitter. Fails if no UDP socket can be bound on the target's IP.
    pub fn start(target: SocketAddr, one_way: Duration) -> io::Result<Self> {
        let front = Arc::new(UdpSocket::bind((target.ip(), 0))?);
        front.set_read_timeout(Some(POLL))?;
        let addr = front.local_addr()?;
        let shape = Shape::new(one_way);
        let relay_shape = Arc::clone(&shape);
        thread::spawn(move || relay(front, target, relay_shape));
        Ok(Self { addr, shape })
    }

    /// Sets the fixed delay every datagram gets, each way, from now on; datagrams already on
    /// their way keep the delay they were given.
    pub fn set_one_way_delay(&self, delay: Duration) {
        self.shape
            .one_way_micros
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// Adds a uniform random delay below `jitter` to every datagram, each way.
    pub fn set_jitter(&self, jitter: Duration) {
        self.shape
            .jitter_micros
            .store(jitter.as_micros() as u64, Ordering::Relaxed);
    }
}

impl Drop for UdpDelayRelay {
    fn drop(&mut self) {
        self.shape.stopped.store(true, Ordering::Relaxed);
    }
}

/// Client -> target: one upstream socket per client address, so that answers find their way
/// back, each with a thread relaying the target's answers.
fn relay(front: Arc<UdpSocket>, target: SocketAddr, shape: Arc<Shape>) {
    let mut to_target = DelayLine::start(Arc::clone(&shape), 0x9E37_79B9_7F4A_7C15);
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buffer = vec![0u8; 65536];
    while !shape.stopped.load(Ordering::Relaxed) {
        let (n, client) = match front.recv_from(&mut buffer) {
            Ok(received) => received,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => return,
        };
        let arrived = Instant::now();
        let upstream = match upstreams.get(&client) {
            Some(upstream) => Arc::clone(upstream),
            None => {
                let Ok(upstream) = open_upstream(&front, client, target, &shape) else {
                    continue;
                };
                upstreams.insert(client, Arc::clone(&upstream));
                upstream
            }
        };
        to_target.push(arrived, buffer[..n].to_vec(), &UdpTo(upstream, target));
    }
}

/// A socket towards the target for `client`, and the thread that relays its answers back
/// through `front`.
fn open_upstream(
    front: &Arc<UdpSocket>,
    client: SocketAddr,
    target: SocketAddr,
    shape: &Arc<Shape>,
) -> io::Result<Arc<UdpSocket>> {
    let upstream = Arc::new(UdpSocket::bind((target.ip(), 0))?);
    upstream.set_read_timeout(Some(POLL))?;
    let (reading, front, shape) = (Arc::clone(&upstream), Arc::clone(front), Arc::clone(shape));
    thread::spawn(move || {
        let seed = u64::from(client.port()) << 32 | 0x2545_F491;
        let mut to_client = DelayLine::start(Arc::clone(&shape), seed);
        let back = UdpTo(front, client);
        let mut buffer = vec![0u8; 65536];
        while !shape.stopped.load(Ordering::Relaxed) {
            match reading.recv_from(&mut buffer) {
                Ok((n, _)) => to_client.push(Instant::now(), buffer[..n].to_vec(), &back),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
        }
    });
    Ok(upstream)
}
