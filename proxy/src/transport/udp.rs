//! The UDP socket under the QUIC endpoint: quinn's own, with each GSO batch kept within what
//! the kernel accepts in one send.
//!
//! quinn hands the socket up to ten datagrams of one size at once, for one `sendmsg` with UDP
//! segmentation offload. Linux refuses a GSO send over 65,535 bytes (the UDP length field)
//! with `EMSGSIZE`, and quinn-udp drops a refused send as if the network had lost it. With
//! datagrams over 6.5 KB (loopback, jumbo-frame LANs) every full batch would be lost; MTU
//! discovery takes those losses for a black hole and falls back to 1,200-byte datagrams. So a
//! batch over the limit goes out as several sends of whole datagrams.
//!
//! If a later send of a split batch would block, the batch is reported blocked and quinn sends
//! it again whole: its first datagrams arrive twice, and the receiver drops the duplicates by
//! packet number, as QUIC does for any duplicate.

use std::{
    fmt,
    io::{self, IoSliceMut},
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use quinn::{
    AsyncUdpSocket, UdpPoller,
    udp::{RecvMeta, Transmit},
};

/// The most bytes one GSO send may carry on Linux.
const MAX_GSO_BYTES: usize = 65_535;

/// A socket that splits GSO batches larger than [`MAX_GSO_BYTES`].
pub(super) struct BoundedGso {
    inner: Arc<dyn AsyncUdpSocket>,
}

impl BoundedGso {
    pub(super) fn new(inner: Arc<dyn AsyncUdpSocket>) -> Arc<Self> {
        Arc::new(Self { inner })
    }
}

impl fmt::Debug for BoundedGso {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundedGso")
            .field("inner", &self.inner)
            .finish()
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

impl AsyncUdpSocket for BoundedGso {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Arc::clone(&self.inner).create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let Some(segment) = transmit.segment_size else {
            return self.inner.try_send(transmit);
        };
        if transmit.contents.len() <= MAX_GSO_BYTES {
            return self.inner.try_send(transmit);
        }
        for range in split_sizes(transmit.contents.len(), segment) {
            let contents = &transmit.contents[range];
            self.inner.try_send(&Transmit {
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
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
