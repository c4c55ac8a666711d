//! Cost of the head framing between proxies and of HTTP/1.1 to a service, per typical head:
//! encoding and decoding a request head; what the sidecar does with it now (view it and
//! write HTTP/1.1 bytes) against what it did through hyper's client (decode into a
//! `HeaderMap`); parsing a response head into its frame; decoding a chunked body; and at the
//! ingress, a client's request head parsed into its frame in place against the `HeaderMap`
//! path (parse, rewrite, encode), and a response frame written back as an HTTP/1.1 head.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use proxy::{
    framing::{
        RequestHead, decode_frame, decode_request_head, encode_request_head, view_request_head,
    },
    http1::{
        ChunkedDecoder, Piece,
        front::{ParsedRequest, parse_request_head, write_response_head},
        parse_response_head, write_request_head,
    },
    rewrite::{forward_request_headers, forward_response_headers, split_target},
};

fn typical_head() -> RequestHead {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("host", "127.0.0.1:4200"),
        ("user-agent", "curl/7.88.1"),
        ("accept", "*/*"),
        ("accept-encoding", "gzip, deflate, br"),
        ("content-type", "application/json"),
        ("content-length", "1024"),
        ("x-request-id", "0f8e2a6c-5d7b-4e3a-9c1d-2b4f6a8e0c1d"),
        ("x-forwarded-for", "127.0.0.1"),
        ("via", "1.1 multi-tier-cloud"),
        (
            "authorization",
            "Bearer eyJhbGciOiJIUzI1NiJ9.e30.ZRrHA1JJJW8opsbCGfG_HACGpVUMN_a9IV7pAx_Zmeo",
        ),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    RequestHead {
        method: Method::POST,
        target: "/api/v1/items?limit=10&page=2".into(),
        headers,
    }
}

fn framing(c: &mut Criterion) {
    let head = typical_head();
    let mut out = BytesMut::with_capacity(4096);
    c.bench_function("framing/encode_request_head", |b| {
        b.iter(|| {
            out.clear();
            encode_request_head(black_box(&head), &mut out).unwrap();
        })
    });
    let mut wire = BytesMut::new();
    encode_request_head(&head, &mut wire).unwrap();
    let wire = wire.freeze();
    c.bench_function("framing/decode_request_head", |b| {
        b.iter(|| {
            let mut buffer = BytesMut::from(&wire[..]);
            let frame = decode_frame(&mut buffer).unwrap().unwrap();
            black_box(decode_request_head(&frame.payload).unwrap())
        })
    });
    let payload = decode_frame(&mut BytesMut::from(&wire[..]))
        .unwrap()
        .unwrap()
        .payload;
    c.bench_function("sidecar/request_head_as_headermap", |b| {
        b.iter(|| black_box(decode_request_head(black_box(&payload)).unwrap()))
    });
    c.bench_function("sidecar/request_head_passed_through", |b| {
        b.iter(|| {
            out.clear();
            let view = view_request_head(black_box(&payload)).unwrap();
            black_box(write_request_head(&view, b"127.0.0.1:8080", &mut out).unwrap())
        })
    });
    let response = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                     content-length: 1024\r\ndate: Sun, 29 Nov 2026 01:00:00 GMT\r\n\
                     server: helloworld\r\nx-request-id: 0f8e2a6c-5d7b-4e3a-9c1d\r\n\r\n";
    c.bench_function("sidecar/response_head_to_frame", |b| {
        b.iter(|| {
            out.clear();
            black_box(parse_response_head(black_box(&response[..]), false, &mut out).unwrap())
        })
    });
    let mut chunked = Vec::new();
    for _ in 0..16 {
        chunked.extend_from_slice(b"400\r\n");
        chunked.extend_from_slice(&[b'a'; 1024]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    c.bench_function("sidecar/chunked_16_x_1KiB", |b| {
        b.iter(|| {
            let mut buffer = BytesMut::from(&chunked[..]);
            let mut decoder = ChunkedDecoder::default();
            while let Some(piece) = decoder.decode(&mut buffer, 1 << 20).unwrap() {
                if piece == Piece::End {
                    break;
                }
                black_box(piece);
            }
        })
    });
}

/// A client's request as curl would send it, and the client's address.
const CLIENT_REQUEST: &[u8] = b"POST /items/api/v1/items?limit=10&page=2 HTTP/1.1\r\n\
    host: 127.0.0.1:4200\r\nuser-agent: curl/7.88.1\r\naccept: */*\r\n\
    accept-encoding: gzip, deflate, br\r\ncontent-type: application/json\r\n\
    content-length: 1024\r\nx-request-id: 0f8e2a6c-5d7b-4e3a-9c1d-2b4f6a8e0c1d\r\n\
    authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.ZRrHA1JJJW8opsbCGfG_HACGpVUMN_a9IV7pAx_Zmeo\r\n\r\n";

fn ingress(c: &mut Criterion) {
    let client = std::net::IpAddr::from([127, 0, 0, 1]);
    let mut out = BytesMut::with_capacity(4096);
    c.bench_function("ingress/request_head_to_frame", |b| {
        b.iter(|| {
            out.clear();
            let parsed = parse_request_head(black_box(CLIENT_REQUEST), 65536, client, &mut out);
            black_box(parsed.unwrap())
        })
    });
    // What hyper's server and the rewrite did: parse into a HeaderMap, rewrite it, encode it.
    c.bench_function("ingress/request_head_through_headermap", |b| {
        b.iter(|| {
            out.clear();
            let mut fields = [httparse::EMPTY_HEADER; 64];
            let mut request = httparse::Request::new(&mut fields);
            request.parse(black_box(CLIENT_REQUEST)).unwrap();
            let mut headers = HeaderMap::with_capacity(request.headers.len());
            for field in request.headers.iter() {
                headers.append(
                    http::HeaderName::from_bytes(field.name.as_bytes()).unwrap(),
                    HeaderValue::from_bytes(field.value).unwrap(),
                );
            }
            let (_, target) = split_target(request.path.unwrap()).unwrap();
            forward_request_headers(&mut headers, client);
            let head = RequestHead {
                method: Method::from_bytes(request.method.unwrap().as_bytes()).unwrap(),
                target,
                headers,
            };
            encode_request_head(&head, &mut out).unwrap();
        })
    });
    let response = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                     content-length: 1024\r\ndate: Sun, 29 Nov 2026 01:00:00 GMT\r\n\
                     server: helloworld\r\nx-request-id: 0f8e2a6c-5d7b-4e3a-9c1d\r\n\r\n";
    let mut frame = BytesMut::new();
    parse_response_head(response, false, &mut frame).unwrap();
    let payload = decode_frame(&mut frame).unwrap().unwrap().payload;
    let mut scratch = BytesMut::new();
    let ParsedRequest::Request(start) =
        parse_request_head(CLIENT_REQUEST, 65536, client, &mut scratch).unwrap()
    else {
        unreachable!("a whole head")
    };
    let context = start.response_context();
    c.bench_function("ingress/response_head_written", |b| {
        b.iter(|| {
            out.clear();
            black_box(write_response_head(black_box(&payload), &context, &mut out).unwrap())
        })
    });
    c.bench_function("ingress/response_head_as_headermap", |b| {
        b.iter(|| {
            let mut head = proxy::framing::decode_response_head(black_box(&payload)).unwrap();
            forward_response_headers(&mut head.headers);
            black_box(head)
        })
    });
}

criterion_group!(benches, framing, ingress);
criterion_main!(benches);
