//! Fuzzes layer-4 chain specs (`proxy::l4::chain`): the text a client asks `l4-proxy` for and
//! the `CHAIN` payload a hop receives from another proxy. A spec that parses is a checked
//! chain (1 to 16 valid, distinct names) whose canonical spelling parses to the same chain and
//! whose encoding decodes to it; a payload that decodes encodes back to exactly its bytes,
//! and its canonical spelling parses to the same chain.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mtc_overlay::lookup::record::validate_name;
use proxy::l4::chain::{Chain, MAX_HOPS};

fn check(chain: &Chain) {
    let hops = chain.hops();
    assert!(
        !hops.is_empty() && hops.len() <= MAX_HOPS,
        "{} hops",
        hops.len()
    );
    for (i, hop) in hops.iter().enumerate() {
        validate_name(&hop.service).expect("a hop's name is valid");
        assert_eq!(chain.position(&hop.service), Some(i), "named twice");
    }
    assert_eq!(chain.client_protocol(), hops[0].protocol);
    let spec = chain.to_string();
    assert_eq!(
        Chain::parse(&spec).as_ref(),
        Ok(chain),
        "{spec} reads back differently"
    );
    assert_eq!(
        Chain::decode(&chain.to_bytes()).as_ref(),
        Ok(chain),
        "{spec} crosses changed"
    );
}

fuzz_target!(|data: &[u8]| {
    if let Ok(chain) = Chain::decode(data) {
        assert_eq!(chain.to_bytes(), data, "a chain has one encoding");
        check(&chain);
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(chain) = Chain::parse(&text) {
        check(&chain);
    }
});
