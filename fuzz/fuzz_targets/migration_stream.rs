//! Arbitrary bytes as a migration stream: the decoder must never panic, never allocate
//! past its caps, and every message it accepts must re-encode to the very bytes it came
//! from (one encoding per message, so nothing is silently reinterpreted).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_migration::protocol::{encode, MessageReader, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let mut reader = MessageReader::new(data);
    let mut offset = 0usize;
    loop {
        let msg = match reader.read_message() {
            Ok(msg) => msg,
            Err(_) => break,
        };
        let mut again = Vec::new();
        // Text is the only thing the encoder clips, and decoded text is within the cap.
        encode(&msg, &mut again).expect("a decoded message re-encodes");
        assert!(again.len() >= HEADER_LEN);
        assert_eq!(&data[offset..offset + again.len()], &again[..], "{:?}", msg.kind());
        offset += again.len();
    }
});
