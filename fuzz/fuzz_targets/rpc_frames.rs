//! Fuzzes the overlay's request-response framing (`mtc_overlay::rpc::read_frame` and
//! `decode_body`) with the messages of the allocator's start protocol (`StartRequest`,
//! `StartResponse`) and of node info (`NodeInfo`), and the content digests blob transfers
//! name: a frame is read as its length prefix says (refused over the protocol's limit, an I/O
//! error when cut short, else exactly its body decoded); whatever decodes encodes back within
//! its limit and decodes to itself; a digest that parses prints as one that parses to it.

#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use mtc_overlay::{
    allocator::protocol::{StartProtocol, StartRequest, StartResponse},
    blob::Digest,
    rpc::{NodeInfo, NodeInfoProtocol, Protocol, RpcError, decode_body, encode_frame, read_frame},
};
use serde::{Serialize, de::DeserializeOwned};

fn round_trip<T>(message: &T, limit: u32)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let frame = encode_frame(message, u32::MAX).expect("a decoded message encodes");
    assert_eq!(
        u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize,
        frame.len() - 4,
        "the length prefix"
    );
    if frame.len() - 4 <= limit as usize {
        let back: T = decode_body(&frame[4..]).expect("an encoded message decodes");
        assert_eq!(&back, message);
        let read: T =
            futures::executor::block_on(read_frame(&mut futures::io::Cursor::new(&frame), limit))
                .expect("an encoded frame reads");
        assert_eq!(&read, message);
    } else {
        assert!(matches!(
            encode_frame(message, limit),
            Err(RpcError::TooLarge { .. })
        ));
    }
}

/// Reads `data` as one frame of `T`, checks the result against what its length prefix says,
/// and checks a message it yields.
fn read<T>(data: &[u8], limit: u32)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let mut reader = futures::io::Cursor::new(data);
    let result = futures::executor::block_on(read_frame::<T, _>(&mut reader, limit));
    let Some(prefix) = data.get(..4) else {
        assert!(matches!(result, Err(RpcError::Io(_))), "{result:?}");
        return;
    };
    let len = u32::from_be_bytes(prefix.try_into().unwrap());
    if len > limit {
        assert!(
            matches!(result, Err(RpcError::TooLarge { .. })),
            "{result:?}"
        );
    } else if data.len() - 4 < len as usize {
        assert!(matches!(result, Err(RpcError::Io(_))), "{result:?}");
    } else {
        let body = &data[4..4 + len as usize];
        match (&result, decode_body::<T>(body)) {
            (Ok(read), Ok(decoded)) => assert_eq!(read, &decoded),
            (Err(RpcError::Malformed(_)), Err(RpcError::Malformed(_))) => {}
            (read, decoded) => panic!("read {read:?}, decoded {decoded:?}"),
        }
    }
    if let Ok(message) = result {
        round_trip(&message, limit);
    }
}

fuzz_target!(|data: &[u8]| {
    read::<StartRequest>(data, StartProtocol::MAX_REQUEST_BYTES);
    read::<StartResponse>(data, StartProtocol::MAX_RESPONSE_BYTES);
    read::<NodeInfo>(data, NodeInfoProtocol::MAX_RESPONSE_BYTES);
    read::<()>(data, NodeInfoProtocol::MAX_REQUEST_BYTES);
    // Bodies without their prefix, as the fuzzer finds them more easily.
    if let Ok(request) = decode_body::<StartRequest>(data) {
        round_trip(&request, StartProtocol::MAX_REQUEST_BYTES);
        if let Ok(digest) = request.digest.parse::<Digest>() {
            assert_eq!(digest.to_string().parse::<Digest>(), Ok(digest));
        }
    }
    if let Ok(response) = decode_body::<StartResponse>(data) {
        round_trip(&response, StartProtocol::MAX_RESPONSE_BYTES);
    }
    if let Ok(info) = decode_body::<NodeInfo>(data) {
        round_trip(&info, NodeInfoProtocol::MAX_RESPONSE_BYTES);
    }
    if let Ok(digest) = decode_body::<Digest>(data) {
        round_trip(&digest, 4096);
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(digest) = text.parse::<Digest>() {
        let printed = digest.to_string();
        assert_eq!(printed.parse::<Digest>(), Ok(digest));
        let hex = text.strip_prefix("sha256:").unwrap_or(&text);
        assert_eq!(digest.hex(), hex.to_ascii_lowercase());
    }
});
