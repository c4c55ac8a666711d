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
const POLL: Duration = Duration::from_millis(100);

/// The delay each datagram gets, one way: `one_way` plus a uniform random part below
/// `jitter`.
struct Shape {
    one_way_micros: AtomicU64,
    jitter_micros: AtomicU64,
    stopped: AtomicBool,
}

impl Shape {
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

/// A datagram on its way: when it is due, where from and where to.
struct InFlight {
    due: Instant,
    datagram: Vec<u8>,
    from: Arc<UdpSocket>,
    to: SocketAddr,
}

/// One direction of the link: datagrams leave in the order they came, each once its delay has
/// passed (a late one holds back the ones behind it, as on a single path).
struct DelayLine {
    queue: Sender<InFlight>,
    shape: Arc<Shape>,
    random: u64,
    last_due: Instant,
}

impl DelayLine {
    fn start(shape: Arc<Shape>, seed: u64) -> Self {
        let (queue, due) = channel();
        thread::spawn(move || deliver(due));
        Self {
            queue,
            shape,
            random: seed | 1,
            last_due: Instant::now(),
        }
    }

    fn push(&mut self, arrived: Instant, datagram: Vec<u8>, from: &Arc<UdpSocket>, to: SocketAddr) {
        let due = (arrived + self.shape.delay(&mut self.random)).max(self.last_due);
        self.last_due = due;
        let _ = self.queue.send(InFlight {
            due,
            datagram,
            from: Arc::clone(from),
            to,
        });
    }
}

/// Sends each datagram when it is due; ends when the line's sender is gone.
fn deliver(due: Receiver<InFlight>) {
    while let Ok(datagram) = due.recv() {
        if let Some(wait) = datagram.due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let _ = datagram.from.send_to(&datagram.datagram, datagram.to);
    }
}

/// A relay in front of `target`: datagrams to [`UdpDelayRelay::addr`] reach the target, and
/// its answers come back, each delayed. A round trip through it takes twice the one-way delay
/// longer. Its threads end soon after it is dropped.
pub struct UdpDelayRelay {
    pub addr: SocketAddr,
    shape: Arc<Shape>,
}

impl UdpDelayRelay {
    pub fn start(target: SocketAddr, one_way: Duration) -> io::Result<Self> {
        let front = Arc::new(UdpSocket::bind((target.ip(), 0))?);
        front.set_read_timeout(Some(POLL))?;
        let addr = front.local_addr()?;
        let shape = Arc::new(Shape {
            one_way_micros: AtomicU64::new(one_way.as_micros() as u64),
            jitter_micros: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
        });
        let relay_shape = Arc::clone(&shape);
        thread::spawn(move || relay(front, target, relay_shape));
        Ok(Self { addr, shape })
    }

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
        to_target.push(arrived, buffer[..n].to_vec(), &upstream, target);
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
        let mut buffer = vec![0u8; 65536];
        while !shape.stopped.load(Ordering::Relaxed) {
            match reading.recv_from(&mut buffer) {
                Ok((n, _)) => to_client.push(Instant::now(), buffer[..n].to_vec(), &front, client),
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
