use std::net::Ipv4Addr;

use super::*;
use crate::framing::{decode_frame, view_request_head};

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

/// What a head was parsed into: the start, and the frame's target and fields as text.
type Parsed<'a> = (RequestStart<'a>, String, Vec<(String, String)>);

/// Parses `head` and returns what it found and the frame's target and fields, as text.
fn parse(head: &str) -> Result<Parsed<'_>, FrontError> {
    let mut frame = BytesMut::new();
    let start = match parse_request_head(head.as_bytes(), 64 * 1024, CLIENT, &mut frame)? {
        ParsedRequest::Request(start) => start,
        ParsedRequest::Partial => panic!("partial: {head:?}"),
    };
    let frame = decode_frame(&mut frame).unwrap().unwrap();
    let view = view_request_head(&frame.payload).unwrap();
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
    let fields = view
        .fields
        .iter()
        .map(|(n, v)| (text(n), text(v)))
        .collect();
    Ok((start, text(view.target), fields))
}

fn names(fields: &[(String, String)]) -> Vec<&str> {
    fields.iter().map(|(n, _)| n.as_str()).collect()
}

#[test]
fn the_service_segment_leaves_the_target_and_the_rest_stays() {
    for (path, service, target) in [
        ("/hello/a/b?x=1", "hello", "/a/b?x=1"),
        ("/hello", "hello", "/"),
        ("/hello/", "hello", "/"),
        ("/hello?x=/y", "hello", "/?x=/y"),
        ("/my.svc-1_b:2/p", "my.svc-1_b:2", "/p"),
    ] {
        let head = format!("GET {path} HTTP/1.1\r\nhost: h\r\n\r\n");
        let (start, t, _) = parse(&head).unwrap();
        assert_eq!((start.service, t.as_str()), (service, target), "{path}");
        assert_eq!(start.head_len, head.len());
    }
}

#[test]
fn a_bad_or_missing_service_is_the_clients_error() {
    for path in ["/", "//x", "/..", "/.", "/-bad%2F", "/a b"] {
        let head = format!("GET {path} HTTP/1.1\r\n\r\n");
        let error = parse(&head).map(|_| ()).unwrap_err();
        assert_eq!(error.status(), 400, "{path}: {error}");
    }
    let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(10_000));
    assert_eq!(parse(&long).map(|_| ()).unwrap_err().status(), 400);
}

#[test]
fn hop_by_hop_fields_go_and_via_and_forwarded_for_come() {
    let head = "POST /s/p HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Secret\r\n\
                X-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nUpgrade: websocket\r\n\
                Proxy-Authorization: x\r\nProxy-Connection: y\r\nX-Forwarded-For: 10.0.0.1\r\n\
                X-Forwarded-For: 10.0.0.2\r\nContent-Length: 3\r\nX-Kept: a\r\nX-Kept: b\r\n\r\n";
    let (start, _, fields) = parse(head).unwrap();
    assert_eq!(
        names(&fields),
        [
            "Host",
            "Content-Length",
            "X-Kept",
            "X-Kept",
            "via",
            "x-forwarded-for"
        ]
    );
    assert_eq!(fields[4].1, VIA);
    assert_eq!(fields[5].1, "10.0.0.1, 192.0.2.7");
    assert_eq!(start.body, RequestBody::Length(3));
    assert!(start.keep_alive && start.trailers && !start.http10);
}

#[test]
fn the_body_is_framed_by_coding_then_length_and_never_both() {
    let head = |extra: &str| format!("POST /s/ HTTP/1.1\r\nHost: h\r\n{extra}\r\n");
    let body = |extra: &str| parse(&head(extra)).map(|(s, _, _)| s.body);
    assert_eq!(body(""), Ok(RequestBody::None));
    assert_eq!(body("Content-Length: 0\r\n"), Ok(RequestBody::None));
    assert_eq!(body("Content-Length: 10\r\n"), Ok(RequestBody::Length(10)));
    assert_eq!(body("Content-Length: 7, 7\r\n"), Ok(RequestBody::Length(7)));
    assert_eq!(
        body("Transfer-Encoding: gzip, chunked\r\n"),
        Ok(RequestBody::Chunked)
    );
    let refused = |extra: &str| body(extra).unwrap_err().status();
    assert_eq!(refused("Transfer-Encoding: gzip\r\n"), 501);
    assert_eq!(
        refused("Transfer-Encoding: chunked\r\nContent-Length: 3\r\n"),
        400
    );
    assert_eq!(refused("Content-Length: 1, 2\r\n"), 400);
    assert_eq!(refused("Content-Length: -1\r\n"), 400);
    // Larger than any u64: the client's error, not a head too large.
    assert_eq!(refused("Content-Length: 18446744073709551616\r\n"), 400);
}

#[test]
fn a_body_without_a_length_is_marked_chunked_for_the_sidecar_whatever_the_method() {
    for method in ["GET", "HEAD", "POST"] {
        let head =
            format!("{method} /s/ HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n");
        let (start, _, fields) = parse(&head).unwrap();
        assert_eq!(start.body, RequestBody::Chunked);
        let marks: Vec<_> = fields
            .iter()
            .filter(|(n, _)| n == "transfer-encoding")
            .collect();
        assert_eq!(
            marks,
            [&("transfer-encoding".into(), "chunked".into())],
            "{method}"
        );
    }
    for extra in ["", "Content-Length: 4\r\n"] {
        let head = format!("GET /s/ HTTP/1.1\r\nHost: h\r\n{extra}\r\n");
        let (_, _, fields) = parse(&head).unwrap();
        assert!(!names(&fields).contains(&"transfer-encoding"), "{extra}");
    }
}

#[test]
fn keep_alive_follows_the_version_and_connection() {
    let keep = |version: &str, connection: &str| {
        let head = format!("GET /s/ {version}\r\n{connection}\r\n");
        parse(&head).unwrap().0.keep_alive
    };
    assert!(keep("HTTP/1.1", ""));
    assert!(!keep("HTTP/1.1", "Connection: close\r\n"));
    assert!(!keep("HTTP/1.0", ""));
    assert!(keep("HTTP/1.0", "Connection: Keep-Alive\r\n"));
}

#[test]
fn a_partial_head_waits_and_one_over_the_limit_is_431() {
    let mut frame = BytesMut::new();
    let partial = b"GET /s/ HTTP/1.1\r\nHost: h\r\n";
    assert_eq!(
        parse_request_head(partial, 1024, CLIENT, &mut frame),
        Ok(ParsedRequest::Partial)
    );
    assert!(frame.is_empty());
    let big = format!("GET /s/ HTTP/1.1\r\nx-big: {}\r\n", "a".repeat(2000));
    let error = parse_request_head(big.as_bytes(), 1024, CLIENT, &mut frame).unwrap_err();
    assert_eq!(error.status(), 431);
    let whole = format!("{big}\r\n");
    let error = parse_request_head(whole.as_bytes(), 1024, CLIENT, &mut frame).unwrap_err();
    assert_eq!(error.status(), 431);
    let malformed = b"GET /s/ HTTP/1.1\r\nbad header\r\n\r\n";
    let error = parse_request_head(malformed, 1024, CLIENT, &mut frame).unwrap_err();
    assert_eq!(error.status(), 400);
    assert!(frame.is_empty(), "nothing is framed for a refused head");
}

/// The HTTP/1.1 head written for a response frame with `status` and `fields`.
fn response(
    status: u16,
    fields: &[(&str, &str)],
    request: &str,
) -> (String, ResponseFraming, bool) {
    let mut frame = BytesMut::new();
    crate::framing::encode_response_fields(
        status,
        fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())),
        &mut frame,
    )
    .unwrap();
    let frame = decode_frame(&mut frame).unwrap().unwrap();
    let (start, _, _) = parse(request).unwrap();
    let mut out = BytesMut::new();
    let (framing, keep_alive) =
        write_response_head(&frame.payload, &start.response_context(), &mut out).unwrap();
    (
        String::from_utf8(out.to_vec()).unwrap(),
        framing,
        keep_alive,
    )
}

const GET: &str = "GET /s/ HTTP/1.1\r\nHost: h\r\n\r\n";

#[test]
fn a_response_with_a_length_passes_through_with_via() {
    let (head, framing, keep) = response(
        200,
        &[("content-length", "5"), ("x-a", "1"), ("Connection", "x-a")],
        GET,
    );
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nvia: 1.1 multi-tier-cloud\r\n\r\n"
    );
    assert_eq!((framing, keep), (ResponseFraming::Length(5), true));
}

#[test]
fn a_response_without_a_length_is_chunked_or_closes() {
    let (head, framing, keep) = response(200, &[("x-a", "1")], GET);
    assert!(
        head.ends_with("transfer-encoding: chunked\r\n\r\n"),
        "{head}"
    );
    assert_eq!(
        (framing, keep),
        (ResponseFraming::Chunked { trailers: false }, true)
    );
    let with_te = "GET /s/ HTTP/1.1\r\nTE: trailers\r\n\r\n";
    assert_eq!(
        response(200, &[], with_te).1,
        ResponseFraming::Chunked { trailers: true }
    );
    let old = "GET /s/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
    let (head, framing, keep) = response(200, &[], old);
    assert!(head.ends_with("connection: close\r\n\r\n"), "{head}");
    assert_eq!((framing, keep), (ResponseFraming::UntilClose, false));
    let (head, framing, keep) = response(200, &[("content-length", "2")], old);
    assert!(head.ends_with("connection: keep-alive\r\n\r\n"), "{head}");
    assert_eq!((framing, keep), (ResponseFraming::Length(2), true));
}

#[test]
fn no_body_after_head_or_for_204_and_304_and_a_close_is_said() {
    let head_request = "HEAD /s/ HTTP/1.1\r\nConnection: close\r\n\r\n";
    let (head, framing, keep) = response(200, &[("content-length", "9")], head_request);
    assert!(head.contains("content-length: 9\r\n"), "{head}");
    assert!(head.ends_with("connection: close\r\n\r\n"), "{head}");
    assert_eq!((framing, keep), (ResponseFraming::None, false));
    for status in [204, 304] {
        assert_eq!(response(status, &[], GET).1, ResponseFraming::None);
    }
    let (head, framing, _) = response(200, &[("content-length", "x")], GET);
    assert!(!head.contains("content-length"), "{head}");
    assert_eq!(framing, ResponseFraming::Chunked { trailers: false });
}

const WEBSOCKET: &str = "GET /s/chat HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\n\
                         Upgrade: websocket\r\nSec-WebSocket-Key: k\r\n\
                         Sec-WebSocket-Version: 13\r\n\r\n";

#[test]
fn an_upgrade_request_keeps_its_upgrade_field_and_nothing_else_hop_by_hop() {
    let (start, _, fields) = parse(WEBSOCKET).unwrap();
    assert!(start.upgrade);
    assert_eq!(
        names(&fields),
        [
            "Host",
            "Upgrade",
            "Sec-WebSocket-Key",
            "Sec-WebSocket-Version",
            "via",
            "x-forwarded-for"
        ]
    );
    // Not an upgrade: `Connection` does not name it, the request has a body, HTTP/1.0, or
    // no `Upgrade` field. Then `Upgrade` is hop-by-hop as ever.
    for head in [
        "GET /s/ HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
        "POST /s/ HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: h2c\r\nContent-Length: 1\r\n\r\n",
        "GET /s/ HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        "GET /s/ HTTP/1.1\r\nConnection: upgrade\r\n\r\n",
    ] {
        let (start, _, fields) = parse(head).unwrap();
        assert!(!start.upgrade, "{head:?}");
        assert!(!names(&fields).contains(&"Upgrade"), "{head:?}");
    }
}

#[test]
fn a_101_to_an_upgrade_switches_and_anything_else_is_an_ordinary_answer() {
    let switching = [("upgrade", "websocket"), ("sec-websocket-accept", "a")];
    let (head, framing, keep) = response(101, &switching, WEBSOCKET);
    assert_eq!(
        head,
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nsec-websocket-accept: a\r\n\
         via: 1.1 multi-tier-cloud\r\nconnection: upgrade\r\n\r\n"
    );
    assert_eq!((framing, keep), (ResponseFraming::None, false));

    let (head, framing, keep) = response(403, &[("content-length", "2")], WEBSOCKET);
    assert!(head.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{head}");
    assert_eq!((framing, keep), (ResponseFraming::Length(2), true));

    // A 101 the client did not ask for switches nothing, and its `Upgrade` stays behind.
    let (head, _, _) = response(101, &switching, GET);
    assert!(!head.contains("upgrade"), "{head}");
}
