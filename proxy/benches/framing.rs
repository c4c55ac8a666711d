//! Cost of the request-head framing between proxies: encoding and decoding a typical head.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use proxy::framing::{RequestHead, decode_frame, decode_request_head, encode_request_head};

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
}

criterion_group!(benches, framing);
criterion_main!(benches);
