//! Fuzzes the ingress's HTTP/1.1 request-head parser (`proxy::http1::front`), what a client
//! sends first: any bytes are refused cleanly (nothing framed), wait for more, or yield a head
//! whose `HEAD` frame is well formed: one frame that the instance's side reads back and writes
//! to its service as a request that parses again, with the service segment taken off the
//! target and no hop-by-hop field crossing but an upgrade's `Upgrade`. A smaller head limit
//! only refuses, never changes a result. A chunked body after the head decodes to the same bytes and trailers whether it
//! arrives whole or a byte at a time.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mtc_overlay::lookup::record::validate_name;
use proxy::{
    framing::{Kind, MAX_HEADERS, decode_frame, view_request_head},
    http1::{
        RequestBody,
        front::{ParsedRequest, parse_request_head},
        write_request_head,
    },
    rewrite::HOP_BY_HOP,
};

fn check(data: &[u8], max_head: usize, client: IpAddr) -> Option<(Vec<u8>, usize)> {
    let mut frame = BytesMut::new();
    let parsed = parse_request_head(data, max_head, client, &mut frame);
    let start = match parsed {
        Err(error) => {
            assert!(frame.is_empty(), "a refused head left a frame ({error})");
            assert!([400, 431, 501].contains(&error.status()), "{error}");
            return None;
        }
        Ok(ParsedRequest::Partial) => {
            assert!(frame.is_empty(), "a partial head left a frame");
            assert!(data.len() <= max_head, "a partial head over the limit");
            return None;
        }
        Ok(ParsedRequest::Request(start)) => start,
    };
    assert!(start.head_len <= data.len() && start.head_len <= max_head);
    // The head ends with an empty line (CRLF or a bare LF, either may end the one before).
    let head = &data[..start.head_len];
    assert!(
        head.ends_with(b"\n\n") || head.ends_with(b"\n\r\n"),
        "{head:?}"
    );
    validate_name(start.service).expect("the service named is a valid name");

    // The client's request line, read again.
    let mut fields = vec![httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut fields);
    assert_eq!(
        request.parse(data).expect("the head parses again"),
        httparse::Status::Complete(start.head_len)
    );
    let path = request.path.expect("a path");

    // One HEAD frame, nothing after it.
    let encoded = frame.to_vec();
    let head = decode_frame(&mut frame)
        .expect("the frame decodes")
        .expect("the frame is whole");
    assert!(frame.is_empty(), "bytes after the HEAD frame");
    assert_eq!(head.kind, Kind::Head);
    let view = view_request_head(&head.payload).expect("the instance reads the head");
    assert_eq!(view.method, start.method);
    let target = std::str::from_utf8(view.target).expect("the target is the client's text");
    let rest = target.strip_prefix('/').expect("a target starts with /");
    let expected = format!("/{}", start.service);
    assert!(
        path == format!("{expected}{target}") || path == format!("{expected}{rest}"),
        "{path} became {target}"
    );
    let mut names: Vec<&[u8]> = view.fields.iter().map(|(name, _)| name).collect();
    // The front's own mark of a body of unknown length, last and only then; no other
    // hop-by-hop field crosses.
    if start.body == RequestBody::Chunked {
        assert_eq!(
            view.fields.iter().last(),
            Some((&b"transfer-encoding"[..], &b"chunked"[..])),
            "a chunked body is marked"
        );
        names.pop();
    }
    // An upgrade's `Upgrade` crosses (and only then).
    if start.upgrade {
        assert!(
            names
                .iter()
                .any(|name| name.eq_ignore_ascii_case(b"upgrade")),
            "an upgrade without its Upgrade field"
        );
        names.retain(|name| !name.eq_ignore_ascii_case(b"upgrade"));
    }
    for name in &names {
        assert!(
            !HOP_BY_HOP
                .iter()
                .any(|hop| name.eq_ignore_ascii_case(hop.as_bytes())),
            "{} crossed",
            String::from_utf8_lossy(name)
        );
    }
    let forwarded: Vec<&[u8]> = view
        .fields
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case(b"x-forwarded-for"))
        .map(|(_, value)| value)
        .collect();
    assert_eq!(forwarded.len(), 1, "one X-Forwarded-For");
    assert!(forwarded[0].ends_with(client.to_string().as_bytes()));
    assert_eq!(names.last(), Some(&&b"x-forwarded-for"[..]));

    // The instance's side writes it to its service: a request that parses, with the same
    // method and target, and the body framed as the client's was.
    let mut out = BytesMut::new();
    let body = write_request_head(&view, b"127.0.0.1:8080", &mut out)
        .expect("a head the ingress framed is written to the service");
    let mut fields = vec![httparse::EMPTY_HEADER; MAX_HEADERS + 8];
    let mut again = httparse::Request::new(&mut fields);
    assert_eq!(
        again.parse(&out).expect("the service's request parses"),
        httparse::Status::Complete(out.len())
    );
    assert_eq!(again.method.map(str::as_bytes), Some(start.method));
    assert_eq!(again.path, Some(target));
    match (start.body, body) {
        (RequestBody::Length(n), sent) => assert_eq!(sent, RequestBody::Length(n)),
        (front, RequestBody::Length(n)) if n > 0 => panic!("{front:?} sent as Length({n})"),
        // A body of unknown length is never dropped, whatever the method.
        (RequestBody::Chunked, sent) => assert_eq!(sent, RequestBody::Chunked),
        _ => {}
    }

    if start.body == RequestBody::Chunked {
        mtc_fuzz::check_chunked(&data[start.head_len..]);
    }
    Some((encoded, start.head_len))
}

fuzz_target!(|data: &[u8]| {
    let v4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
    let v6 = IpAddr::V6(Ipv6Addr::new(
        0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff,
    ));
    let client = if data.len() % 2 == 0 { v4 } else { v6 };
    let large = check(data, 64 * 1024, client);
    let small = check(data, 512, client);
    // A smaller limit only refuses heads over it.
    match (&large, &small) {
        (Some(large), Some(small)) => assert_eq!(large, small),
        (Some((_, len)), None) => assert!(*len > 512, "refused under the smaller limit"),
        (None, Some(_)) => panic!("accepted only under the smaller limit"),
        (None, None) => {}
    }
});
