use bytes::BufMut;
use http::{HeaderMap, HeaderValue, Method};

use super::*;
use crate::framing::{
    RequestHead, decode_frame, decode_response_head, decode_trailers, encode_request_head,
    view_request_head,
};

/// `head` as a `HEAD` frame's payload, as the ingress sends it.
fn frame_of(method: &str, target: &str, fields: &[(&str, &str)]) -> Bytes {
    let mut headers = HeaderMap::new();
    for (name, value) in fields {
        headers.append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    let head = RequestHead {
        method: Method::from_bytes(method.as_bytes()).unwrap(),
        target: target.into(),
        headers,
    };
    let mut wire = BytesMut::new();
    encode_request_head(&head, &mut wire).unwrap();
    decode_frame(&mut wire).unwrap().unwrap().payload
}

fn request_text(payload: &[u8]) -> (String, Result<RequestBody, Http1Error>) {
    let view = view_request_head(payload).unwrap();
    let mut out = BytesMut::new();
    let body = write_request_head(&view, b"127.0.0.1:8080", &mut out);
    (String::from_utf8(out.to_vec()).unwrap(), body)
}

#[test]
fn the_clients_protocol_is_read_off_the_ingresss_via_entry() {
    for (vias, h2) in [
        (&[crate::rewrite::VIA_H2][..], true),
        (&[crate::rewrite::VIA][..], false),
        (&["2 edge", crate::rewrite::VIA][..], false),
        (&["1.1 edge, 2 multi-tier-cloud"][..], true),
        (&[][..], false),
    ] {
        let fields: Vec<(&str, &str)> = vias.iter().map(|via| ("via", *via)).collect();
        let payload = frame_of("GET", "/", &fields);
        let view = view_request_head(&payload).unwrap();
        assert_eq!(arrived_over_h2(view.fields), h2, "{vias:?}");
    }
}

#[test]
fn a_grpc_call_is_told_by_its_content_type() {
    for (content_type, grpc) in [
        ("application/grpc", true),
        ("Application/gRPC+proto", true),
        ("application/grpc; charset=x", true),
        ("application/grpc-web", false),
        ("application/json", false),
        ("application/grp", false),
    ] {
        let payload = frame_of("POST", "/a.B/C", &[("content-type", content_type)]);
        let view = view_request_head(&payload).unwrap();
        assert_eq!(is_grpc(view.fields), grpc, "{content_type}");
    }
}

#[test]
fn an_upgrade_goes_to_the_service_with_connection_upgrade() {
    let payload = frame_of(
        "GET",
        "/chat",
        &[
            ("host", "h"),
            ("upgrade", "websocket"),
            ("connection", "upgrade"),
        ],
    );
    let (text, body) = request_text(&payload);
    assert_eq!(
        text,
        "GET /chat HTTP/1.1\r\nhost: h\r\nupgrade: websocket\r\nte: trailers\r\n\
         connection: upgrade\r\n\r\n"
    );
    assert_eq!(body, Ok(RequestBody::None));
    let view = view_request_head(&payload).unwrap();
    assert!(asks_upgrade(view.fields));
}

#[test]
fn a_request_head_passes_through_with_this_hops_fields() {
    let payload = frame_of(
        "GET",
        "/a/b?c=d",
        &[
            ("host", "example"),
            ("accept", "*/*"),
            ("x-many", "1"),
            ("x-many", "2"),
        ],
    );
    let (text, body) = request_text(&payload);
    assert_eq!(
        text,
        "GET /a/b?c=d HTTP/1.1\r\nhost: example\r\naccept: */*\r\nx-many: 1\r\nx-many: 2\r\n\
         te: trailers\r\n\r\n"
    );
    assert_eq!(body, Ok(RequestBody::None));
}

#[test]
fn host_is_added_and_the_client_hops_fields_are_not_passed() {
    let payload = frame_of(
        "GET",
        "/",
        &[
            ("te", "gzip"),
            ("connection", "x"),
            ("keep-alive", "5"),
            ("transfer-encoding", "chunked"),
        ],
    );
    let (text, _) = request_text(&payload);
    // The ingress's `transfer-encoding` says a body follows: this hop's own framing says so.
    assert_eq!(
        text,
        "GET / HTTP/1.1\r\nhost: 127.0.0.1:8080\r\nte: trailers\r\ntransfer-encoding: chunked\r\n\r\n"
    );
}

#[test]
fn the_body_framing_follows_content_length_then_the_method() {
    let (text, body) = request_text(&frame_of("POST", "/", &[("content-length", "5")]));
    assert_eq!(body, Ok(RequestBody::Length(5)));
    assert!(!text.contains("transfer-encoding"), "{text}");
    let (text, body) = request_text(&frame_of("POST", "/", &[]));
    assert_eq!(body, Ok(RequestBody::Chunked));
    assert!(
        text.ends_with("transfer-encoding: chunked\r\n\r\n"),
        "{text}"
    );
    for method in ["GET", "HEAD", "CONNECT"] {
        assert_eq!(
            request_text(&frame_of(method, "/", &[])).1,
            Ok(RequestBody::None)
        );
        // Unless the ingress marked a body of unknown length: it is sent, chunked, once.
        let (text, body) =
            request_text(&frame_of(method, "/", &[("transfer-encoding", "chunked")]));
        assert_eq!(body, Ok(RequestBody::Chunked), "{method}");
        assert_eq!(text.matches("transfer-encoding").count(), 1, "{text}");
    }
    assert_eq!(
        request_text(&frame_of("PUT", "/", &[("content-length", "7, 7")])).1,
        Ok(RequestBody::Length(7))
    );
    for bad in ["5, 6", "x", "", "-1", "99999999999999999999"] {
        let (_, body) = request_text(&frame_of("PUT", "/", &[("content-length", bad)]));
        assert!(
            matches!(body, Err(Http1Error::ContentLength(_))),
            "{bad}: {body:?}"
        );
    }
}

#[test]
fn a_head_with_control_characters_is_refused_before_anything_is_written() {
    // A name with a space, a value with CR LF, a target with a space: the frame is checked
    // when it is viewed, so no such byte reaches a service.
    let mut payload = BytesMut::new();
    payload.put_slice(&[1, 3]);
    payload.put_slice(b"GET");
    payload.put_u16(1);
    payload.put_slice(b"/");
    payload.put_u16(1);
    payload.put_u16(1);
    payload.put_slice(b"x");
    payload.put_u16(9);
    payload.put_slice(b"a\r\nevil: ");
    assert!(matches!(
        view_request_head(&payload),
        Err(FrameError::Invalid {
            what: "header value",
            ..
        })
    ));
    let mut payload = BytesMut::new();
    payload.put_slice(&[1, 3]);
    payload.put_slice(b"GET");
    payload.put_u16(3);
    payload.put_slice(b"/ x");
    payload.put_u16(0);
    assert!(matches!(
        view_request_head(&payload),
        Err(FrameError::Invalid { what: "target", .. })
    ));
}

/// Parses `text` fed in pieces of `step` bytes, as it would arrive.
fn parse_in_steps(text: &[u8], after_head: bool, step: usize) -> (ResponseStart, Bytes) {
    let mut buffer = BytesMut::new();
    let mut frame = BytesMut::new();
    for piece in text.chunks(step) {
        buffer.put_slice(piece);
        loop {
            match parse_response_head(&buffer, after_head, &mut frame).unwrap() {
                Parsed::Partial => break,
                Parsed::Interim(len) => buffer.advance(len),
                Parsed::Response(start) => {
                    let payload = decode_frame(&mut frame).unwrap().unwrap().payload;
                    return (start, payload);
                }
            }
        }
    }
    panic!("no response in {:?}", String::from_utf8_lossy(text));
}

#[test]
fn a_response_head_is_reframed_without_its_hop_fields_whatever_the_pieces() {
    let text = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nServer: s\r\n\
                 Transfer-Encoding: chunked\r\nConnection: keep-alive\r\nX-A: 1\r\n\r\n5\r\nhello";
    for step in [1, 2, 7, text.len()] {
        let (start, payload) = parse_in_steps(text, false, step);
        assert_eq!(start.status, 201);
        assert_eq!(start.body, ResponseBody::Chunked);
        assert!(start.keep_alive);
        let interim = b"HTTP/1.1 100 Continue\r\n\r\n".len();
        assert_eq!(start.head_len, text.len() - interim - b"5\r\nhello".len());
        let head = decode_response_head(&payload).unwrap();
        assert_eq!(head.status, 201);
        let names: Vec<_> = head.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["server", "x-a"]);
    }
}

fn start_of(text: &str, after_head: bool) -> ResponseStart {
    parse_in_steps(text.as_bytes(), after_head, text.len()).0
}

#[test]
fn the_response_body_length_follows_rfc_9112() {
    let cases = [
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
            false,
            ResponseBody::Length(3),
            true,
        ),
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
            true,
            ResponseBody::None,
            true,
        ),
        (
            "HTTP/1.1 204 No Content\r\n\r\n",
            false,
            ResponseBody::None,
            true,
        ),
        (
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            false,
            ResponseBody::None,
            true,
        ),
        (
            "HTTP/1.1 200 OK\r\n\r\n",
            false,
            ResponseBody::UntilClose,
            false,
        ),
        (
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n",
            false,
            ResponseBody::Chunked,
            true,
        ),
        (
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            false,
            ResponseBody::UntilClose,
            false,
        ),
        (
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            false,
            ResponseBody::Length(0),
            false,
        ),
        (
            "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
            false,
            ResponseBody::Length(0),
            false,
        ),
        (
            "HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: Keep-Alive\r\n\r\n",
            false,
            ResponseBody::Length(0),
            true,
        ),
    ];
    for (text, after_head, body, keep_alive) in cases {
        let start = start_of(text, after_head);
        assert_eq!((start.body, start.keep_alive), (body, keep_alive), "{text}");
    }
}

/// The fuzzer's find: with `Transfer-Encoding: chunked` beside it, the service's
/// `Content-Length` crossed to the client, who was told a length the body did not have.
#[test]
fn a_content_length_beside_a_transfer_encoding_does_not_cross() {
    let text =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\nx-a: 1\r\n\r\n";
    let mut frame = BytesMut::new();
    let Ok(Parsed::Response(start)) = parse_response_head(text, false, &mut frame) else {
        panic!("not a response");
    };
    assert_eq!(start.body, ResponseBody::Chunked);
    let framed = String::from_utf8_lossy(&frame).to_ascii_lowercase();
    assert!(!framed.contains("content-length"), "{framed}");
    assert!(framed.contains("x-a"), "{framed}");
}

#[test]
fn malformed_and_oversized_response_heads_are_errors() {
    let mut frame = BytesMut::new();
    for bad in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n"[..],
        b"HTTP/1.1 2000 OK\r\n\r\n",
        // Three digits, but no status (the fuzzer's find).
        b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n",
        b"NOT HTTP\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
    ] {
        assert!(
            parse_response_head(bad, false, &mut frame).is_err(),
            "{}",
            String::from_utf8_lossy(bad)
        );
        assert!(frame.is_empty());
    }
    let mut huge = b"HTTP/1.1 200 OK\r\n".to_vec();
    while huge.len() <= MAX_HEAD_BYTES {
        huge.extend_from_slice(b"x-filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    assert!(matches!(
        parse_response_head(&huge, false, &mut frame),
        Err(Http1Error::HeadTooLarge | Http1Error::Head(_))
    ));
    let many: String = std::iter::once("HTTP/1.1 200 OK\r\n".to_owned())
        .chain((0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")))
        .chain(std::iter::once("\r\n".to_owned()))
        .collect();
    assert!(matches!(
        parse_response_head(many.as_bytes(), false, &mut frame),
        Err(Http1Error::Head(_))
    ));
}

#[test]
fn chunk_size_lines_are_lowercase_hex() {
    for (len, text) in [
        (0, "0\r\n"),
        (1, "1\r\n"),
        (15, "f\r\n"),
        (16, "10\r\n"),
        (0x12345, "12345\r\n"),
    ] {
        let (line, n) = chunk_size_line(len);
        assert_eq!(&line[..n], text.as_bytes(), "{len}");
    }
}

/// Decodes `wire` fed in pieces of `step` bytes; data joined, trailers decoded.
fn decode_in_steps(wire: &[u8], step: usize, max: usize) -> (Vec<u8>, Option<HeaderMap>, usize) {
    let mut decoder = ChunkedDecoder::default();
    let mut buffer = BytesMut::new();
    let (mut data, mut trailers) = (Vec::new(), None);
    for piece in wire.chunks(step) {
        buffer.put_slice(piece);
        while let Some(piece) = decoder.decode(&mut buffer, max).unwrap() {
            match piece {
                Piece::Data(bytes) => {
                    assert!(bytes.len() <= max);
                    data.extend_from_slice(&bytes);
                }
                Piece::Trailers(frame) => {
                    let mut frame = BytesMut::from(&frame[..]);
                    let payload = decode_frame(&mut frame).unwrap().unwrap().payload;
                    trailers = Some(decode_trailers(&payload).unwrap());
                }
                Piece::End => {
                    assert!(decoder.is_done());
                    return (data, trailers, buffer.len());
                }
            }
        }
    }
    panic!("the body did not end");
}

#[test]
fn chunked_bodies_decode_whatever_the_pieces() {
    let wire =
        b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\ngrpc-status: 0\r\n\r\nNEXT";
    for step in [1, 2, 3, 9, wire.len()] {
        for max in [1, 4, 1 << 20] {
            let (data, trailers, left) = decode_in_steps(wire, step, max);
            assert_eq!(data, b"helloabcdefghijklmnopqrstuvwxyz");
            assert_eq!(trailers.unwrap()["grpc-status"], "0");
            assert!(left <= 4, "the bytes after the body stay in the buffer");
        }
    }
    let (data, trailers, _) = decode_in_steps(b"3\r\nabc\r\n0\r\n\r\n", 1, 1 << 20);
    assert_eq!((data, trailers), (b"abc".to_vec(), None));
}

#[test]
fn malformed_chunked_bodies_are_errors() {
    for bad in [
        &b"x\r\n"[..],
        b"\r\n",
        b"5\r\nhelloXX",
        b"1234567890abcdef0\r\n",
        b"0\r\nbad trailer\r\n\r\n",
    ] {
        let mut decoder = ChunkedDecoder::default();
        let mut buffer = BytesMut::from(bad);
        let mut result = Ok(None);
        for _ in 0..4 {
            result = decoder.decode(&mut buffer, 1 << 20);
            if !matches!(result, Ok(Some(Piece::Data(_)))) {
                break;
            }
        }
        assert!(
            result.is_err(),
            "{}: {result:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let mut decoder = ChunkedDecoder::default();
    let mut endless = BytesMut::from(&vec![b'1'; MAX_SIZE_LINE + 1][..]);
    assert!(decoder.decode(&mut endless, 1 << 20).is_err());
}
