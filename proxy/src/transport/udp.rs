//! The UDP socket under the QUIC endpoint: registered with the runtime for reading only,
//! taking a few datagrams per receive, and each GSO batch kept within what the kernel accepts
//! in one send.
//!
//! **Read interest only.** quinn's own socket (tokio's `UdpSocket`) is registered for reading
//! and writing, edge-triggered. Linux reports a UDP socket writable again each time a datagram
//! it sent frees its buffer space, which on loopback happens inside the very `sendmsg`: an
//! event nobody waits for, so the runtime's next sleep returns at once, costing an
//! `epoll_wait` and a turn of the event loop for every datagram sent before a sleep (measured:
//! three `epoll_wait`s per request on each proxy where two wait for something). Sending needs
//! no event: a send is tried at once, and only one that would block (the buffer full) makes
//! its sender wait for write space, through a second registration, for writing only, of a
//! duplicate of the socket's descriptor, dropped as soon as the space is there ([`WriteSpace`]).
//!
//! **At most [`RECV_SLOTS`] datagrams per receive**, for memory (see there).
//!
//! **GSO batches within the kernel's limit.** quinn hands the socket up to ten datagrams of
//! one size at once, for one `sendmsg` with UDP segmentation offload. Linux refuses a GSO send
//! over 65,535 bytes (the UDP length field) with `EMSGSIZE`, and quinn-udp drops a refused send
//! as if the network had lost it. With datagrams over 6.5 KB (loopback, jumbo-frame LANs) every
//! full batch would be lost; MTU discovery takes those losses for a black hole and falls back
//! to 1,200-byte datagrams. So a batch over the limit goes out as several sends of whole
//! datagrams. If a later send of a split batch would block, the batch is reported blocked and
//! quinn sends it again whole: its first datagrams arrive twice, and the receiver drops the
//! duplicates by packet number, as QUIC does for any duplicate.

use std::{
    io::{self, IoSliceMut},
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
};

use quinn::{
    AsyncUdpSocket, UdpPoller,
    udp::{RecvMeta, Transmit, UdpSocketState},
};
use tokio::io::{Interest, unix::AsyncFd};

/// The most bytes one GSO send may carry on Linux.
const MAX_GSO_BYTES: usize = 65_535;

/// Datagrams one receive takes at most. quinn offers 32 slots of its receive buffer, each
/// room for a GRO batch; with 64 KiB datagrams (loopback, jumbo frames) a streaming burst
/// fills every slot it is given, and those pages stay resident. 8 slots (each still up to 64
/// KiB, or a GRO batch of small datagrams) keep 1.5 MiB less per proxy resident while
/// streaming, at the same throughput (`bench stream`).
const RECV_SLOTS: usize = 8;

/// The endpoint's socket (see the module doc).
#[derive(Debug)]
pub(super) struct Socket {
    io: AsyncFd<std::net::UdpSocket>,
    state: UdpSocketState,
    /// A send would have blocked, and no sender has seen write space since.
    blocked: AtomicBool,
}

impl Socket {
    /// Takes over `socket`; within a Tokio runtime.
    pub(super) fn new(socket: std::net::UdpSocket) -> io::Result<Arc<Self>> {
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new((&socket).into())?;
        Ok(Arc::new(Self {
            io: register(socket, Interest::READABLE)?,
            state,
            blocked: AtomicBool::new(false),
        }))
    }

    /// One `sendmsg`; a send that would block marks the socket blocked.
    fn send(&self, transmit: &Transmit) -> io::Result<()> {
        let sent = self.state.send(self.io.get_ref().into(), transmit);
        if let Err(error) = &sent
            && error.kind() == io::ErrorKind::WouldBlock
        {
            self.blocked.store(true, Ordering::Relaxed);
        }
        sent
    }
}

/// The sends a transmit of `len` bytes in segments of `segment` bytes goes out in: each a
/// whole number of segments, at most [`MAX_GSO_BYTES`] (pure, for the tests).
fn split_sizes(len: usize, segment: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let per_send = (MAX_GSO_BYTES / segment.max(1)).max(1) * segment.max(1);
    (0..len)
        .step_by(per_send)
        .map(move |start| start..(start + per_send).min(len))
}

impl AsyncUdpSocket for Socket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(WriteSpace {
            socket: self,
            waiting: None,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let Some(segment) = transmit.segment_size else {
            return self.send(transmit);
        };
        if transmit.contents.len() <= MAX_GSO_BYTES {
            return self.send(transmit);
        }
        for range in split_sizes(transmit.contents.len(), segment) {
            let contents = &transmit.contents[range];
            self.send(&Transmit {
                contents,
                segment_size: (contents.len() > segment).then_some(segment),
                ..transmit.clone()
            })?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let slots = bufs.len().min(RECV_SLOTS);
        let (bufs, meta) = (&mut bufs[..slots], &mut meta[..slots]);
        loop {
            let mut ready = ready!(self.io.poll_read_ready(cx))?;
            // A read that would block clears the readiness and waits for the next edge.
            if let Ok(read) = ready.try_io(|io| self.state.recv(io.get_ref().into(), bufs, meta)) {
                return Poll::Ready(read);
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }
}

/// One sender's wait for write space (quinn asks before every send; it makes one of these per
/// connection and one for the endpoint). Ready at once unless a send blocked since write space
/// was last seen.
#[derive(Debug)]
struct WriteSpace {
    socket: Arc<Socket>,
    /// While blocked: the socket's descriptor, duplicated, registered for writing only.
    waiting: Option<AsyncFd<OwnedFd>>,
}

impl UdpPoller for WriteSpace {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.socket.blocked.load(Ordering::Relaxed) {
            this.waiting = None;
            return Poll::Ready(Ok(()));
        }
        ready!(poll_write_space(
            &mut this.waiting,
            this.socket.io.get_ref().as_fd(),
            cx
        ))?;
        this.socket.blocked.store(false, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

/// Registers `fd`, which it owns, with the runtime for `interest`.
fn register<T: AsRawFd>(fd: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: `T` (a socket or an `OwnedFd`) owns its descriptor, keeps it open until dropped
    // and always returns the same one.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(io::Error::from)
}

/// Waits until `fd` has write space, registering a duplicate of it for write readiness in
/// `waiting` for as long as that takes (and no longer). A registration made while the space is
/// already there reports it at once, so no wake-up is lost between a blocked send and this.
fn poll_write_space(
    waiting: &mut Option<AsyncFd<OwnedFd>>,
    fd: BorrowedFd<'_>,
    cx: &mut Context,
) -> Poll<io::Result<()>> {
    let registration = match waiting {
        Some(registration) => registration,
        None => waiting.insert(register(fd.try_clone_to_owned()?, Interest::WRITABLE)?),
    };
    drop(ready!(registration.poll_write_ready(cx))?);
    *waiting = None;
    Poll::Ready(Ok(()))
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        os::unix::net::UnixStream,
        time::Duration,
    };

    use super::*;

    /// The event masks registered with this process's epoll instances for the file `fd` is
    /// open on, under any descriptor of it, from `/proc/self/fdinfo` (`tfd: <fd> events: <hex
    /// mask> data: .. pos:.. ino:<hex inode>` lines of the epoll descriptors; one instance
    /// may be listed under several descriptors).
    fn epoll_masks(fd: i32) -> Vec<u32> {
        let inode = {
            let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
            let link = link.to_string_lossy();
            let digits = link.trim_start_matches(|c: char| !c.is_ascii_digit());
            let inode: u64 = digits.trim_end_matches(']').parse().unwrap();
            format!("{inode:x}")
        };
        let mut masks = Vec::new();
        for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            let is_epoll = std::fs::read_link(entry.path())
                .is_ok_and(|target| target.to_string_lossy() == "anon_inode:[eventpoll]");
            if !is_epoll {
                continue;
            }
            let info_path = format!("/proc/self/fdinfo/{}", entry.file_name().to_string_lossy());
            let Ok(info) = std::fs::read_to_string(info_path) else {
                continue;
            };
            for line in info.lines() {
                let words: Vec<&str> = line.split_whitespace().collect();
                let field = |name: &str| {
                    let at = words.iter().position(|word| *word == name)?;
                    words.get(at + 1).copied()
                };
                if words
                    .iter()
                    .any(|word| word.strip_prefix("ino:") == Some(&inode))
                {
                    masks.push(u32::from_str_radix(field("events:").unwrap(), 16).unwrap());
                }
            }
        }
        masks
    }

    #[tokio::test]
    async fn the_runtime_watches_the_socket_for_reading_only() {
        let socket = Socket::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let reading_only = |masks: &[u32]| {
            !masks.is_empty()
                && masks.iter().all(|mask| {
                    mask & libc::EPOLLIN as u32 != 0 && mask & libc::EPOLLOUT as u32 == 0
                })
        };
        let masks = epoll_masks(socket.io.get_ref().as_raw_fd());
        assert!(reading_only(&masks), "registrations: {masks:x?}");
        // A sender that never blocked is ready at once and registers nothing more.
        let mut poller = Arc::clone(&socket).create_io_poller();
        let ready = std::future::poll_fn(|cx| Poll::Ready(poller.as_mut().poll_writable(cx)));
        assert!(matches!(ready.await, Poll::Ready(Ok(()))));
        let masks = epoll_masks(socket.io.get_ref().as_raw_fd());
        assert!(reading_only(&masks), "registrations: {masks:x?}");
    }

    #[tokio::test]
    async fn a_receive_takes_at_most_its_slots_of_the_buffer() {
        let socket = Socket::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = socket.local_addr().unwrap();
        for i in 0..3 * RECV_SLOTS {
            sender.send_to(&[i as u8; 100], to).unwrap();
        }
        let mut buffer = vec![0; 32 * 2048];
        let mut bufs: Vec<IoSliceMut> = buffer.chunks_mut(2048).map(IoSliceMut::new).collect();
        let mut meta = [RecvMeta::default(); 32];
        let mut received = 0;
        while received < 3 * RECV_SLOTS {
            let got = tokio::time::timeout(
                Duration::from_secs(10),
                std::future::poll_fn(|cx| socket.poll_recv(cx, &mut bufs, &mut meta)),
            )
            .await
            .expect("the datagrams sent")
            .unwrap();
            assert!(got <= RECV_SLOTS, "{got} slots in one receive");
            // A slot may hold a GRO batch of several datagrams.
            received += meta[..got]
                .iter()
                .map(|m| m.len / m.stride.max(1))
                .sum::<usize>();
        }
    }

    #[tokio::test]
    async fn a_blocked_sender_waits_for_write_space_and_then_stops_watching() {
        // A Unix stream whose peer does not read blocks its writer (a UDP socket on loopback
        // frees its buffer within the send, so it cannot be made to block here).
        let (writer, mut reader) = UnixStream::pair().unwrap();
        writer.set_nonblocking(true).unwrap();
        let mut filled = 0;
        loop {
            match (&writer).write(&[0; 4096]) {
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let mut waiting = None;
        let first = std::future::poll_fn(|cx| {
            Poll::Ready(poll_write_space(&mut waiting, writer.as_fd(), cx))
        });
        assert!(first.await.is_pending(), "ready with a full buffer");
        let watching = |masks: Vec<u32>| masks.iter().any(|m| m & libc::EPOLLOUT as u32 != 0);
        assert!(watching(epoll_masks(writer.as_raw_fd())));
        let mut drained = 0;
        let mut buffer = vec![0; 64 << 10];
        while drained < filled {
            drained += reader.read(&mut buffer).unwrap();
        }
        tokio::time::timeout(
            Duration::from_secs(10),
            std::future::poll_fn(|cx| poll_write_space(&mut waiting, writer.as_fd(), cx)),
        )
        .await
        .expect("write space within 10 s of the peer reading")
        .unwrap();
        assert!(waiting.is_none(), "still watching for write space");
        assert!(!watching(epoll_masks(writer.as_raw_fd())));
    }

    #[test]
    fn a_batch_over_the_limit_goes_out_in_whole_segments_each_within_it() {
        for (len, segment) in [
            (89_720, 8_972),
            (654_950, 65_495),
            (12_000, 1_200),
            (65_535, 1),
        ] {
            let sends: Vec<_> = split_sizes(len, segment).collect();
            assert_eq!(sends.first().map(|r| r.start), Some(0));
            assert_eq!(sends.last().map(|r| r.end), Some(len));
            for pair in sends.windows(2) {
                assert_eq!(pair[0].end, pair[1].start);
            }
            for send in &sends[..sends.len() - 1] {
                assert!(send.len() <= MAX_GSO_BYTES);
                assert_eq!(send.len() % segment, 0, "{len} in {segment}: {send:?}");
            }
        }
        assert_eq!(split_sizes(89_720, 8_972).count(), 2);
        assert_eq!(split_sizes(654_950, 65_495).count(), 10);
    }
}
