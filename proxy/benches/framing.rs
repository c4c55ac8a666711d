//! Cost of the head framing between proxies and of HTTP/1.1 to a service, per typical head:
//! encoding and decoding a request head; what the sidecar does with it now (view it and
//! write HTTP/1.1 bytes) against what it did through hyper's client (decode into a
//! `HeaderMap`); parsing a response head into its frame; decoding a chunked body.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use proxy::{
    framing::{
        RequestHead, decode_frame, decode_request_head, encode_request_head, view_request_head,
    },
    http1::{ChunkedDecoder, Piece, parse_response_head, write_request_head},
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

criterion_group!(benches, framing);
criterion_main!(benches);
