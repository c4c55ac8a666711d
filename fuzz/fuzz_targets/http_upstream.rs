//! Fuzzes what a sidecar reads from its service (`proxy::http1::parse_response_head` and the
//! chunked decoder): any bytes are refused cleanly (nothing framed), wait for more, are
//! skipped as interim responses, or yield a response whose `HEAD` frame the ingress reads back
//! with the same status and every field but the framing ones, in order, and writes to its
//! client as a response that parses again, its body framed as the sidecar reads it (a length
//! only where the sidecar reads exactly that length). A chunked body decodes to the same bytes
//! and trailers whole or a byte at a time.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use proxy::{
    framing::{Kind, MAX_HEAD_BYTES, MAX_HEADERS, decode_frame, view_response_head},
    http1::{
        Parsed, ResponseBody,
        front::{ResponseContext, ResponseFraming, write_response_head},
        parse_response_head,
    },
};

fn framing_field(name: &[u8]) -> bool {
    [&b"transfer-encoding"[..], b"connection", b"keep-alive"]
        .iter()
        .any(|field| name.eq_ignore_ascii_case(field))
}

fuzz_target!(|data: &[u8]| {
    // The first byte says how the request was made; the rest is what the service sent.
    let Some((&flags, mut buffer)) = data.split_first() else {
        return;
    };
    let context = ResponseContext {
        head_request: flags & 1 != 0,
        http10: flags & 2 != 0,
        keep_alive: flags & 4 != 0,
        trailers: flags & 8 != 0,
        upgrade: flags & 16 != 0,
    };
    let mut frame = BytesMut::new();
    // As the sidecar does: interim responses are skipped, the final one framed.
    let start = loop {
        match parse_response_head(buffer, context.head_request, &mut frame) {
            Err(_) => {
                assert!(frame.is_empty(), "a refused head left a frame");
                return;
            }
            Ok(Parsed::Partial) => {
                assert!(frame.is_empty(), "a partial head left a frame");
                assert!(
                    buffer.len() <= MAX_HEAD_BYTES,
                    "a partial head over the limit"
                );
                return;
            }
            Ok(Parsed::Interim(len)) => {
                assert!(frame.is_empty(), "an interim response was framed");
                assert!(len > 0 && len <= buffer.len() && len <= MAX_HEAD_BYTES);
                buffer = &buffer[len..];
            }
            Ok(Parsed::Response(start)) => break start,
        }
    };
    assert!(start.head_len <= buffer.len() && start.head_len <= MAX_HEAD_BYTES);
    assert!(!(100..200).contains(&start.status) || start.status == 101);

    // The service's head, read again: the fields that cross are all but the framing ones,
    // and but Content-Length beside a Transfer-Encoding (RFC 9112 section 6.3).
    let mut fields = vec![httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut fields);
    assert_eq!(
        response.parse(buffer).expect("the head parses again"),
        httparse::Status::Complete(start.head_len)
    );
    let coded = response
        .headers
        .iter()
        .any(|field| field.name.eq_ignore_ascii_case("transfer-encoding"));
    let crossing: Vec<(&[u8], &[u8])> = response
        .headers
        .iter()
        .map(|field| (field.name.as_bytes(), field.value))
        .filter(|(name, _)| {
            !framing_field(name) && !(coded && name.eq_ignore_ascii_case(b"content-length"))
        })
        .collect();

    // One HEAD frame, as the ingress reads it.
    let head = decode_frame(&mut frame)
        .expect("the frame decodes")
        .expect("the frame is whole");
    assert!(frame.is_empty(), "bytes after the HEAD frame");
    assert_eq!(head.kind, Kind::Head);
    let (status, fields) = view_response_head(&head.payload).expect("the ingress reads the head");
    assert_eq!(status, start.status);
    assert_eq!(fields.iter().collect::<Vec<_>>(), crossing);

    // The ingress writes it to its client: a response that parses, with the same status.
    let mut out = BytesMut::new();
    let (framing, _keep_alive) = write_response_head(&head.payload, &context, &mut out)
        .expect("a head the sidecar framed is written to the client");
    let mut fields = vec![httparse::EMPTY_HEADER; MAX_HEADERS + 8];
    let mut again = httparse::Response::new(&mut fields);
    assert_eq!(
        again.parse(&out).expect("the client's response parses"),
        httparse::Status::Complete(out.len())
    );
    assert_eq!(again.code, Some(start.status));
    // The client is told a length only when the sidecar reads exactly that many bytes.
    match (start.body, framing) {
        (ResponseBody::Length(sent), ResponseFraming::Length(told)) => assert_eq!(sent, told),
        (body, ResponseFraming::Length(told)) => {
            panic!("the sidecar reads the body as {body:?}; the client is told {told} bytes")
        }
        (ResponseBody::Length(sent), framing) if framing != ResponseFraming::None => {
            panic!("a body of {sent} bytes goes to the client as {framing:?}")
        }
        _ => {}
    }
    if start.body == ResponseBody::None {
        assert_eq!(
            framing,
            ResponseFraming::None,
            "a body the sidecar does not read"
        );
    }

    if start.body == ResponseBody::Chunked {
        mtc_fuzz::check_chunked(&buffer[start.head_len..]);
    }
});
