//! What an API socket answers, as `ferry-remote` and the tests' client read it
//! (`vmm::api::client::parse_reply`): any bytes, complete or cut short, give a reply, an
//! error or "not yet" — never a panic — and a reply never claims more bytes than it read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::api::client::parse_reply;

fuzz_target!(|data: &[u8]| {
    for eof in [false, true] {
        if let Ok(Some((reply, used))) = parse_reply(data, eof) {
            assert!(used <= data.len());
            assert!(reply.body.len() <= used);
            let _ = reply.error_message();
        }
    }
});
