//! Decoding one direction of a stream from the chunks QUIC hands over, without copying bodies.
//!
//! A QUIC receive stream yields its bytes as chunks that share the memory of the datagrams
//! they arrived in; chunk boundaries have nothing to do with frame boundaries. The
//! [`Decoder`] takes chunks as they come ([`Decoder::push`]) and gives back ([`Decoder::next_piece`]):
//!
//! - DATA payloads as [`Piece::Data`], in pieces as they arrive: each piece is a slice of a
//!   chunk, never a copy, and no DATA frame is waited for whole;
//! - every other frame whole, as [`Piece::Frame`]: a slice of its chunk when it lies within
//!   one (the common case: heads are small), copied together only when it straddles chunks.
//!
//! Limits are checked from each header before anything of the payload is kept.

use bytes::{Buf, Bytes, BytesMut};

use super::{
    FRAME_HEADER_BYTES, Frame, FrameError, Kind, MAX_DATA_BYTES, MAX_DATAGRAM_BYTES, MAX_HEAD_BYTES,
};

/// The kind and payload length in a frame header, checked against the limits.
pub fn parse_header(header: &[u8]) -> Result<(Kind, usize), FrameError> {
    let kind = match header[0] {
        1 => Kind::Head,
        2 => Kind::Data,
        3 => Kind::Trailers,
        4 => Kind::Ping,
        5 => Kind::Refused,
        6 => Kind::Failed,
        7 => Kind::Chain,
        8 => Kind::Ready,
        9 => Kind::Datagram,
        other => return Err(FrameError::UnknownKind(other)),
    };
    let len = u32::from_be_bytes(header[1..FRAME_HEADER_BYTES].try_into().expect("4 bytes"));
    let len = len as usize;
    let limit = match kind {
        Kind::Data => MAX_DATA_BYTES,
        Kind::Datagram => MAX_DATAGRAM_BYTES,
        _ => MAX_HEAD_BYTES,
    };
    if len > limit {
        return Err(FrameError::TooLarge { kind, len, limit });
    }
    Ok((kind, len))
}

/// What the decoder gives back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// A whole frame other than DATA.
    Frame(Frame),
    /// Some of a DATA frame's payload (never empty).
    Data(Bytes),
}

/// See the module doc.
#[derive(Debug, Default)]
pub struct Decoder {
    /// What is left of the last chunk pushed.
    pending: Bytes,
    /// A header, or a whole non-DATA frame, that straddles chunks, gathered so far.
    straddling: BytesMut,
    /// Payload bytes of the current DATA frame still to come.
    data_left: usize,
}

impl Decoder {
    /// Adds the next chunk of the stream; call only when [`Decoder::next_piece`] gave `None`.
    pub fn push(&mut self, chunk: Bytes) {
        debug_assert!(
            self.pending.is_empty(),
            "pushed before the last chunk was used"
        );
        self.pending = chunk;
    }

    /// The next piece, or `None` when it needs another chunk.
    pub fn next_piece(&mut self) -> Result<Option<Piece>, FrameError> {
        loop {
            if self.data_left > 0 {
                if self.pending.is_empty() {
                    return Ok(None);
                }
                let n = self.data_left.min(self.pending.len());
                self.data_left -= n;
                return Ok(Some(Piece::Data(self.pending.split_to(n))));
            }
            if self.straddling.is_empty() && self.pending.len() >= FRAME_HEADER_BYTES {
                // The header within the chunk: no copy of it or of a payload that follows.
                let (kind, len) = parse_header(&self.pending)?;
                if kind == Kind::Data {
                    self.pending.advance(FRAME_HEADER_BYTES);
                    self.data_left = len;
                    continue;
                }
                if self.pending.len() >= FRAME_HEADER_BYTES + len {
                    self.pending.advance(FRAME_HEADER_BYTES);
                    let payload = self.pending.split_to(len);
                    return Ok(Some(Piece::Frame(Frame { kind, payload })));
                }
            }
            if self.pending.is_empty() {
                return Ok(None);
            }
            // Across chunks: gather the header, then (not DATA) the whole frame.
            let have = self.straddling.len();
            let wanted = if have < FRAME_HEADER_BYTES {
                FRAME_HEADER_BYTES
            } else {
                FRAME_HEADER_BYTES + parse_header(&self.straddling)?.1
            };
            let take = (wanted - have).min(self.pending.len());
            self.straddling
                .extend_from_slice(&self.pending.split_to(take));
            if self.straddling.len() < FRAME_HEADER_BYTES {
                continue;
            }
            let (kind, len) = parse_header(&self.straddling)?;
            if kind == Kind::Data {
                self.straddling.clear();
                self.data_left = len;
                continue;
            }
            if self.straddling.len() == FRAME_HEADER_BYTES + len {
                let mut frame = self.straddling.split();
                frame.advance(FRAME_HEADER_BYTES);
                let payload = frame.freeze();
                return Ok(Some(Piece::Frame(Frame { kind, payload })));
            }
        }
    }

    /// Whether the stream may end here: nothing is buffered in the middle of a frame.
    pub fn at_boundary(&self) -> bool {
        self.pending.is_empty() && self.straddling.is_empty() && self.data_left == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::frame_header;

    fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut wire = frame_header(kind, payload.len()).to_vec();
        wire.extend_from_slice(payload);
        wire
    }

    /// A head, three DATA frames (one empty), trailers.
    fn direction() -> Vec<u8> {
        let body: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        [
            frame(Kind::Head, b"a head"),
            frame(Kind::Data, &body[..1000]),
            frame(Kind::Data, b""),
            frame(Kind::Data, &body[1000..]),
            frame(Kind::Trailers, b"trailers"),
        ]
        .concat()
    }

    /// Decodes `wire` pushed in chunks of `size` bytes: the frames, the body, and whether it
    /// ended at a frame boundary.
    fn decode(wire: &[u8], size: usize) -> Result<(Vec<Frame>, Vec<u8>, bool), FrameError> {
        let wire = Bytes::copy_from_slice(wire);
        let mut decoder = Decoder::default();
        let (mut frames, mut body) = (Vec::new(), Vec::new());
        for start in (0..wire.len()).step_by(size) {
            decoder.push(wire.slice(start..(start + size).min(wire.len())));
            while let Some(piece) = decoder.next_piece()? {
                match piece {
                    Piece::Frame(frame) => frames.push(frame),
                    Piece::Data(data) => {
                        assert!(!data.is_empty());
                        body.extend_from_slice(&data);
                    }
                }
            }
        }
        Ok((frames, body, decoder.at_boundary()))
    }

    #[test]
    fn any_chunking_gives_the_same_frames_and_body() {
        let wire = direction();
        let whole = decode(&wire, wire.len()).unwrap();
        assert_eq!(whole.0.len(), 2);
        assert_eq!(whole.0[0].payload, &b"a head"[..]);
        assert_eq!(whole.0[1].kind, Kind::Trailers);
        assert_eq!(whole.1.len(), 3000);
        assert!(whole.2);
        for size in 1..=64 {
            assert_eq!(decode(&wire, size).unwrap(), whole, "chunks of {size}");
        }
    }

    #[test]
    fn a_stream_cut_in_a_frame_is_not_at_a_boundary() {
        let wire = direction();
        for cut in [1, 4, 5, 8, 12, 20, wire.len() - 1] {
            let (_, _, at_boundary) = decode(&wire[..cut], 7).unwrap();
            assert!(!at_boundary, "cut at {cut}");
        }
    }

    #[test]
    fn payloads_within_a_chunk_share_its_memory() {
        let wire = Bytes::from(direction());
        let range = wire.as_ptr() as usize..wire.as_ptr() as usize + wire.len();
        let mut decoder = Decoder::default();
        decoder.push(wire.clone());
        while let Some(piece) = decoder.next_piece().unwrap() {
            let bytes = match piece {
                Piece::Frame(frame) => frame.payload,
                Piece::Data(data) => data,
            };
            assert!(range.contains(&(bytes.as_ptr() as usize)), "copied");
        }
    }

    #[test]
    fn limits_and_unknown_kinds_are_refused_from_the_header() {
        let too_large = frame_header(Kind::Head, MAX_HEAD_BYTES + 1);
        let unknown = [10, 0, 0, 0, 0];
        for (wire, size) in [(&too_large[..], 5), (&too_large[..], 2), (&unknown[..], 1)] {
            assert!(decode(wire, size).is_err(), "{wire:?} in chunks of {size}");
        }
        let datagram = frame_header(Kind::Datagram, MAX_DATAGRAM_BYTES + 1);
        assert_eq!(
            decode(&datagram, 5),
            Err(FrameError::TooLarge {
                kind: Kind::Datagram,
                len: MAX_DATAGRAM_BYTES + 1,
                limit: MAX_DATAGRAM_BYTES
            })
        );
        let data = frame_header(Kind::Data, MAX_DATA_BYTES + 1);
        assert_eq!(
            decode(&data, 3),
            Err(FrameError::TooLarge {
                kind: Kind::Data,
                len: MAX_DATA_BYTES + 1,
                limit: MAX_DATA_BYTES
            })
        );
    }
}
