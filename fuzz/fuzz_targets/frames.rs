//! Fuzzes what a proxy reads from another proxy over QUIC (`proxy::framing` and the
//! connection's first bytes, `proxy::transport::auth::Proof`):
//! - a stream of frames decodes the same whether split off one buffer (`decode_frame`) or
//!   pushed in chunks of any size through the streaming `Decoder`: the same frames, the same
//!   body bytes, the same error, the same end;
//! - every payload a peer may send, in a frame or as the whole input: a head that decodes
//!   re-encodes to exactly its bytes (the borrowed views) or to a head that decodes equal (the
//!   owned forms), and is written as HTTP/1.1 (to a service, or to a client) that parses again
//!   with the same method and target, or status; trailers, probe answers, chains and tunnel
//!   datagrams round-trip;
//! - a decoded proof re-encodes to exactly its bytes, and checking it never panics.

#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use proxy::{
    framing::{
        Decoder, Frame, FrameError, Health, Kind, MAX_HEADERS, Piece, decode_frame,
        decode_request_head, decode_response_head, decode_trailers, encode_request_fields,
        encode_request_head, encode_response_fields, encode_response_head, encode_trailers,
        frame_header, view_request_head, view_response_head,
    },
    http1::{
        front::{ResponseContext, write_response_head},
        write_request_head,
    },
    l4::{chain::Chain, datagrams},
    transport::auth::{KEYING_MATERIAL_BYTES, Proof, Role},
};

/// What a direction decoded to: frames other than DATA with the body bytes between them
/// (consecutive DATA payloads joined, empty ones dropped), and how it stopped.
#[derive(Debug, PartialEq)]
struct Decoded {
    events: Vec<(Option<Kind>, Bytes)>,
    error: Option<FrameError>,
}

impl Decoded {
    fn new() -> Self {
        Self {
            events: Vec::new(),
            error: None,
        }
    }

    fn data(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        match self.events.last_mut() {
            Some((None, data)) => {
                let mut joined = data.to_vec();
                joined.extend_from_slice(bytes);
                *data = joined.into();
            }
            _ => self.events.push((None, Bytes::copy_from_slice(bytes))),
        }
    }

    fn frame(&mut self, frame: Frame) {
        if frame.kind == Kind::Data {
            self.data(&frame.payload);
        } else {
            self.events.push((Some(frame.kind), frame.payload));
        }
    }
}

/// Splits frames off one buffer; returns what was decoded and whether bytes are left over.
fn whole(data: &[u8]) -> (Decoded, bool) {
    let mut buffer = BytesMut::from(data);
    let mut decoded = Decoded::new();
    loop {
        match decode_frame(&mut buffer) {
            Ok(Some(frame)) => decoded.frame(frame),
            Ok(None) => return (decoded, !buffer.is_empty()),
            Err(error) => {
                decoded.error = Some(error);
                return (decoded, true);
            }
        }
    }
}

/// Pushes `data` through a `Decoder` in chunks of `size`; returns what was decoded and whether
/// it stopped at a frame boundary.
fn streamed(data: &[u8], size: usize) -> (Decoded, bool) {
    let data = Bytes::copy_from_slice(data);
    let mut decoder = Decoder::default();
    let mut decoded = Decoded::new();
    for start in (0..data.len()).step_by(size) {
        decoder.push(data.slice(start..(start + size).min(data.len())));
        loop {
            match decoder.next_piece() {
                Ok(Some(Piece::Data(bytes))) => {
                    assert!(!bytes.is_empty(), "an empty data piece");
                    decoded.data(&bytes);
                }
                Ok(Some(Piece::Frame(frame))) => {
                    assert_ne!(frame.kind, Kind::Data, "a DATA frame given whole");
                    decoded.frame(frame);
                }
                Ok(None) => break,
                Err(error) => {
                    decoded.error = Some(error);
                    return (decoded, false);
                }
            }
        }
    }
    let at_boundary = decoder.at_boundary();
    (decoded, at_boundary)
}

fn check_stream(data: &[u8]) {
    let (expected, left_over) = whole(data);
    let first = data.first().copied().unwrap_or(0);
    for size in [data.len().max(1), 1, 2 + usize::from(first % 13)] {
        let (decoded, at_boundary) = streamed(data, size);
        if expected.error.is_some() || !left_over {
            // Refused at the same frame, or ended at a boundary: the same in any chunks.
            assert_eq!(decoded, expected, "chunks of {size}");
            assert_eq!(at_boundary, !left_over, "chunks of {size}");
        } else {
            // Cut in a frame: the same whole frames; the streaming decoder may have passed on
            // more of a DATA frame.
            assert!(decoded.error.is_none() && !at_boundary, "chunks of {size}");
            let frames = |d: &Decoded| -> Vec<(Option<Kind>, Bytes)> {
                d.events.iter().filter(|e| e.0.is_some()).cloned().collect()
            };
            assert_eq!(frames(&decoded), frames(&expected), "chunks of {size}");
            let body = |d: &Decoded| -> Vec<u8> {
                d.events
                    .iter()
                    .filter(|e| e.0.is_none())
                    .flat_map(|e| e.1.to_vec())
                    .collect()
            };
            assert!(
                body(&decoded).starts_with(&body(&expected)),
                "chunks of {size}"
            );
        }
    }
    for (kind, payload) in expected.events {
        if let Some(kind) = kind {
            check_payload(kind, &payload);
        }
    }
}

/// The frame `kind` with `payload`, as bytes.
fn framed(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut frame = frame_header(kind, payload.len()).to_vec();
    frame.extend_from_slice(payload);
    frame
}

fn parses_as_request(out: &[u8], method: &[u8], target: &[u8]) {
    let mut fields = vec![httparse::EMPTY_HEADER; MAX_HEADERS + 8];
    let mut request = httparse::Request::new(&mut fields);
    assert_eq!(
        request
            .parse(out)
            .expect("the request to the service parses"),
        httparse::Status::Complete(out.len())
    );
    assert_eq!(request.method.map(str::as_bytes), Some(method));
    assert_eq!(request.path.map(str::as_bytes), Some(target));
}

fn check_request_head(payload: &[u8]) {
    if let Ok(view) = view_request_head(payload) {
        let mut again = BytesMut::new();
        encode_request_fields(view.method, &[view.target], view.fields, &mut again)
            .expect("a head read re-encodes");
        assert_eq!(
            again[..],
            framed(Kind::Head, payload)[..],
            "not the same bytes"
        );
        let mut out = BytesMut::new();
        if write_request_head(&view, b"service:80", &mut out).is_ok() {
            // The target may not be UTF-8; compare it as bytes.
            match std::str::from_utf8(view.target) {
                Ok(_) => parses_as_request(&out, view.method, view.target),
                Err(_) => assert!(out.starts_with(view.method)),
            }
        }
    }
    if let Ok(head) = decode_request_head(payload) {
        view_request_head(payload).expect("a head that decodes is read in place too");
        let mut again = BytesMut::new();
        encode_request_head(&head, &mut again).expect("a decoded head re-encodes");
        let frame = decode_frame(&mut again).unwrap().unwrap();
        assert_eq!(decode_request_head(&frame.payload).as_ref(), Ok(&head));
    }
}

fn check_response_head(payload: &[u8]) {
    if let Ok((status, fields)) = view_response_head(payload) {
        let mut again = BytesMut::new();
        encode_response_fields(status, fields, &mut again).expect("a head read re-encodes");
        assert_eq!(
            again[..],
            framed(Kind::Head, payload)[..],
            "not the same bytes"
        );
        for flags in [0u8, 5, 10, 15, 20] {
            let context = ResponseContext {
                head_request: flags & 1 != 0,
                http10: flags & 2 != 0,
                keep_alive: flags & 4 != 0,
                trailers: flags & 8 != 0,
                upgrade: flags & 16 != 0,
            };
            let mut out = BytesMut::new();
            write_response_head(payload, &context, &mut out)
                .expect("a head read is written to the client");
            let mut fields = vec![httparse::EMPTY_HEADER; MAX_HEADERS + 8];
            let mut response = httparse::Response::new(&mut fields);
            assert_eq!(
                response
                    .parse(&out)
                    .expect("the response to the client parses"),
                httparse::Status::Complete(out.len())
            );
            assert_eq!(response.code, Some(status));
        }
    }
    if let Ok(head) = decode_response_head(payload) {
        let mut again = BytesMut::new();
        encode_response_head(&head, &mut again).expect("a decoded head re-encodes");
        let frame = decode_frame(&mut again).unwrap().unwrap();
        assert_eq!(decode_response_head(&frame.payload).as_ref(), Ok(&head));
    }
}

fn check_payload(kind: Kind, payload: &[u8]) {
    match kind {
        Kind::Head => {
            check_request_head(payload);
            check_response_head(payload);
        }
        Kind::Trailers => {
            if let Ok(trailers) = decode_trailers(payload) {
                let mut again = BytesMut::new();
                encode_trailers(&trailers, &mut again).expect("decoded trailers re-encode");
                let frame = decode_frame(&mut again).unwrap().unwrap();
                assert_eq!(decode_trailers(&frame.payload).as_ref(), Ok(&trailers));
            }
        }
        Kind::Ping => {
            let health = Health::decode(payload);
            assert_eq!(Health::decode(&health.encode()), health);
        }
        Kind::Chain => {
            if let Ok(chain) = Chain::decode(payload) {
                assert_eq!(chain.to_bytes(), payload, "a chain has one encoding");
            }
        }
        Kind::Datagram => {
            let payload = Bytes::copy_from_slice(payload);
            if let Some((stream, rest)) = datagrams::split(payload.clone()) {
                assert_eq!(datagrams::join(stream, &rest), payload);
            }
            let joined = datagrams::join(7, &payload);
            assert_eq!(datagrams::split(joined), Some((7, payload)));
        }
        // Text for people (REFUSED, FAILED, READY) and bodies: nothing parses them.
        Kind::Data | Kind::Refused | Kind::Failed | Kind::Ready => {}
    }
}

fn check_proof(data: &[u8]) {
    let Ok(proof) = Proof::decode(data) else {
        return;
    };
    assert_eq!(proof.encode(), data, "a proof has one encoding");
    let material = [7; KEYING_MATERIAL_BYTES];
    for key in [None, Some(&[1; 32])] {
        // Forged proofs are refused; what matters here is that checking one never panics.
        let _ = proof.verify(None, key, Role::Client, &material);
    }
}

fuzz_target!(|data: &[u8]| {
    check_stream(data);
    for kind in [
        Kind::Head,
        Kind::Trailers,
        Kind::Ping,
        Kind::Chain,
        Kind::Datagram,
    ] {
        check_payload(kind, data);
    }
    check_proof(data);
});
