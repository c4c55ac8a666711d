//! Fuzzes image-archive inspection (`control::lookup::archive::inspect`), which hl-cli and
//! hl-service run over whatever archive they are given: any bytes are refused with a reason or
//! described truly (the size and SHA-256 of exactly those bytes, an image ID that is the
//! digest of a config the archive holds under that name), and the result does not depend on
//! how the reads are split.

#![no_main]

use std::io::Read;

use control::{blob::Digest, lookup::archive::inspect};
use libfuzzer_sys::fuzz_target;

/// A reader that hands out at most `step` bytes per read.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fuzz_target!(|data: &[u8]| {
    let whole = inspect(data);
    let step = 1 + data.first().map_or(0, |&b| usize::from(b % 61));
    let trickled = inspect(Trickle { data, step });
    match (&whole, &trickled) {
        (Ok(whole), Ok(trickled)) => assert_eq!(whole, trickled, "reads of {step}"),
        (Err(_), Err(_)) => {}
        (whole, trickled) => panic!("whole: {whole:?}, in reads of {step}: {trickled:?}"),
    }
    if let Ok(info) = whole {
        assert_eq!(info.size, data.len() as u64);
        assert_eq!(info.digest, Digest::of(data));
        // The config is an entry named by its digest: the name is in the archive's bytes.
        let hex = info.image_id.hex();
        assert!(
            data.to_ascii_lowercase()
                .windows(hex.len())
                .any(|window| window == hex.as_bytes()),
            "no entry is named {hex}"
        );
    }
});
