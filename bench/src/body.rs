//! Bodies of any size that are never held whole: made from one static buffer, or read and
//! counted as they arrive.

use std::convert::Infallible;

use bytes::{Buf, Bytes};
use futures::Stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Body, Frame};

/// Size of each chunk of a made body.
const CHUNK: usize = 64 * 1024;
/// What every body is made of.
pub static FILLER: [u8; CHUNK] = [b'x'; CHUNK];

/// A body of `total` bytes made 64 KiB at a time from one static buffer, so neither end ever
/// holds it whole (it has no length, so HTTP/1.1 sends it chunked).
pub fn chunked_body(
    total: u64,
) -> StreamBody<impl Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Unpin + 'static> {
    let chunks = (0..total).step_by(CHUNK).map(move |offset| {
        let len = (total - offset).min(CHUNK as u64) as usize;
        Ok(Frame::data(Bytes::from_static(&FILLER[..len])))
    });
    StreamBody::new(futures::stream::iter(chunks))
}

/// Reads a body to its end without keeping it; returns how many bytes it had.
pub async fn drain<B>(mut body: B) -> Result<u64, B::Error>
where
    B: Body + Unpin,
{
    let mut received = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            received += data.remaining() as u64;
        }
    }
    Ok(received)
}
