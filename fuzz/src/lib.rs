//! What more than one fuzz target checks.

use bytes::{Bytes, BytesMut};
use proxy::{
    framing::{Kind, decode_frame, decode_trailers},
    http1::{ChunkedDecoder, Piece},
};

/// What a chunked body decoded to, once its last chunk was read: its bytes and the
/// `TRAILERS` frame, if it had trailers.
pub type Body = (Vec<u8>, Option<Bytes>);

/// Decodes a chunked body from `buffer` in pieces of at most `max` bytes; `None` if it is
/// refused or does not end within the bytes. Checks each piece as it comes.
pub fn chunked(mut buffer: BytesMut, max: usize) -> Option<Body> {
    let mut decoder = ChunkedDecoder::default();
    let (mut data, mut trailers) = (Vec::new(), None);
    loop {
        match decoder.decode(&mut buffer, max).ok()?? {
            Piece::Data(bytes) => {
                assert!(!bytes.is_empty(), "an empty data piece");
                assert!(
                    bytes.len() <= max,
                    "a data piece of {} over {max}",
                    bytes.len()
                );
                data.extend_from_slice(&bytes);
            }
            Piece::Trailers(frame) => {
                assert!(trailers.is_none(), "trailers twice");
                trailers = Some(frame);
            }
            Piece::End => {
                assert!(decoder.is_done());
                return Some((data, trailers));
            }
        }
    }
}

/// The same as [`chunked`], the body arriving one byte at a time.
pub fn chunked_bytewise(body: &[u8], max: usize) -> Option<Body> {
    let mut decoder = ChunkedDecoder::default();
    let (mut data, mut trailers) = (Vec::new(), None);
    let mut buffer = BytesMut::new();
    for &byte in body {
        buffer.extend_from_slice(&[byte]);
        while let Some(piece) = decoder.decode(&mut buffer, max).ok()? {
            match piece {
                Piece::Data(bytes) => data.extend_from_slice(&bytes),
                Piece::Trailers(frame) => trailers = Some(frame),
                Piece::End => return Some((data, trailers)),
            }
        }
    }
    None
}

/// Checks a chunked body three ways (whole, in small pieces, byte by byte): those that end
/// agree, and trailers make a `TRAILERS` frame the other proxy reads.
pub fn check_chunked(body: &[u8]) {
    let whole = chunked(BytesMut::from(body), usize::MAX);
    let small = chunked(BytesMut::from(body), 3);
    let bytewise = chunked_bytewise(body, 7);
    if let (Some(whole), Some(small)) = (&whole, &small) {
        assert_eq!(whole, small, "the piece size changed the body");
    }
    if let (Some(whole), Some(bytewise)) = (&whole, &bytewise) {
        assert_eq!(whole, bytewise, "arrival a byte at a time changed the body");
    }
    if let Some((_, Some(trailers))) = whole {
        let mut trailers = BytesMut::from(&trailers[..]);
        let frame = decode_frame(&mut trailers)
            .expect("a trailers frame decodes")
            .expect("a trailers frame is whole");
        assert!(trailers.is_empty());
        assert_eq!(frame.kind, Kind::Trailers);
        decode_trailers(&frame.payload).expect("the other proxy reads the trailers");
    }
}
