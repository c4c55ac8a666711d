//! Fuzzes the control-protocol codec: whatever bytes a peer sends, reading a frame of the
//! lookup protocol either fails cleanly or yields a message that encodes back, decodes, and
//! encodes again to the same bytes; a service record parsed from JSON survives a round trip
//! too.

#![no_main]

use control::{
    lookup::{
        ServiceRecord,
        protocol::{LookupProtocol, LookupRequest, LookupResponse},
    },
    rpc::{Protocol, decode_body, encode_frame, read_frame},
};
use libfuzzer_sys::fuzz_target;

fn round_trip<T>(message: &T, limit: u32)
where
    T: serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let frame = encode_frame(message, u32::MAX).expect("a decoded message encodes");
    if frame.len() - 4 <= limit as usize {
        let back: T = decode_body(&frame[4..]).expect("an encoded message decodes");
        // Compared as encoded: a record's CPU limit may be NaN, which equals nothing.
        let again = encode_frame(&back, u32::MAX).expect("a decoded message encodes");
        assert_eq!(again, frame, "{message:?} came back as {back:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut reader = futures::io::Cursor::new(data);
    let request = futures::executor::block_on(read_frame::<LookupRequest, _>(
        &mut reader,
        LookupProtocol::MAX_REQUEST_BYTES,
    ));
    if let Ok(request) = request {
        round_trip(&request, LookupProtocol::MAX_REQUEST_BYTES);
    }
    if let Ok(response) = decode_body::<LookupResponse>(data) {
        round_trip(&response, LookupProtocol::MAX_RESPONSE_BYTES);
    }
    if let Ok(record) = ServiceRecord::from_json(data) {
        let again =
            ServiceRecord::from_json(&record.to_json()).expect("a written record reads back");
        assert_eq!(again.to_json(), record.to_json());
    }
});
