//! A userspace UDP relay that delays every datagram: an emulated long link in front of a QUIC
//! endpoint, on loopback, with no privileges (where `tc netem` would need them and a network
//! namespace). Delay and jitter can be changed while it runs.

use std::{
    collections::{HashMap, hash_map::Entry},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::UdpSocket,
    sync::mpsc::{UnboundedSender, unbounded_channel},
    time::Instant,
};

/// The delay each datagram gets, one way: `one_way` plus a uniform random part below
/// `jitter`. Datagrams keep their order (a late one holds back the ones behind it), as on a
/// single path.
struct Shape {
    one_way_micros: AtomicU64,
    jitter_micros: AtomicU64,
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

/// A relay in front of `target`: datagrams to [`UdpDelayRelay::addr`] reach the target, and
/// its answers come back, each delayed. A round trip through it takes twice the one-way delay
/// longer. Runs until the runtime ends.
pub struct UdpDelayRelay {
    pub addr: SocketAddr,
    shape: Arc<Shape>,
}

impl UdpDelayRelay {
    pub async fn start(target: SocketAddr, one_way: Duration) -> std::io::Result<Self> {
        let front = Arc::new(UdpSocket::bind((target.ip(), 0)).await?);
        let addr = front.local_addr()?;
        let shape = Arc::new(Shape {
            one_way_micros: AtomicU64::new(one_way.as_micros() as u64),
            jitter_micros: AtomicU64::new(0),
        });
        let relay_shape = Arc::clone(&shape);
        tokio::spawn(async move {
            // One upstream socket per client address, so answers find their way back.
            let mut upstreams: HashMap<SocketAddr, UnboundedSender<(Instant, Vec<u8>)>> =
                HashMap::new();
            let mut buffer = vec![0u8; 65536];
            loop {
                let Ok((n, client)) = front.recv_from(&mut buffer).await else {
                    return;
                };
                let arrived = Instant::now();
                let to_target = match upstreams.entry(client) {
                    Entry::Occupied(open) => open.into_mut(),
                    Entry::Vacant(vacant) => {
                        let Ok(upstream) = UdpSocket::bind((target.ip(), 0)).await else {
                            continue;
                        };
                        let upstream = Arc::new(upstream);
                        let to_client = delay_line(Arc::clone(&relay_shape), {
                            let front = Arc::clone(&front);
                            move |datagram| {
                                let front = Arc::clone(&front);
                                async move {
                                    let _ = front.send_to(&datagram, client).await;
                                }
                            }
                        });
                        let sending = Arc::clone(&upstream);
                        let to_target = delay_line(Arc::clone(&relay_shape), move |datagram| {
                            let upstream = Arc::clone(&sending);
                            async move {
                                let _ = upstream.send_to(&datagram, target).await;
                            }
                        });
                        tokio::spawn(async move {
                            let mut buffer = vec![0u8; 65536];
                            while let Ok((n, _)) = upstream.recv_from(&mut buffer).await {
                                let datagram = (Instant::now(), buffer[..n].to_vec());
                                if to_client.send(datagram).is_err() {
                                    return;
                                }
                            }
                        });
                        vacant.insert(to_target)
                    }
                };
                let _ = to_target.send((arrived, buffer[..n].to_vec()));
            }
        });
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

/// A task that hands each datagram to `send` once its delay has passed since it arrived, in
/// arrival order.
fn delay_line<F, Fut>(shape: Arc<Shape>, send: F) -> UnboundedSender<(Instant, Vec<u8>)>
where
    F: Fn(Vec<u8>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let (sender, mut receiver) = unbounded_channel::<(Instant, Vec<u8>)>();
    tokio::spawn(async move {
        let mut random = 0x9E37_79B9_7F4A_7C15_u64 ^ u64::from(std::process::id());
        let mut last_due = Instant::now();
        while let Some((arrived, datagram)) = receiver.recv().await {
            let due = (arrived + shape.delay(&mut random)).max(last_due);
            last_due = due;
            tokio::time::sleep_until(due).await;
            send(datagram).await;
        }
    });
    sender
}
