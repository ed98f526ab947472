//! The API socket's request parser on arbitrary bytes: it never panics, and what it
//! accepts is self-delimiting (the same request from exactly its own bytes, every shorter
//! prefix only "incomplete") and routable.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::api::http::{parse_request, ParseError, Response, MAX_BODY};
use vmm::api::routes;

fuzz_target!(|data: &[u8]| {
    match parse_request(data) {
        Ok((req, used)) => {
            assert!(used > 0 && used <= data.len());
            assert!(req.body.len() <= MAX_BODY);
            assert!(req.path.starts_with('/'));
            let (again, used_again) =
                parse_request(&data[..used]).expect("a request parses from its own bytes");
            assert_eq!((&again, used_again), (&req, used));
            if used <= 2048 {
                for cut in 0..used {
                    match parse_request(&data[..cut]) {
                        Err(ParseError::Incomplete(_)) => {}
                        other => panic!("prefix of {cut} of {used} bytes: {other:?}"),
                    }
                }
            }
            match routes::route(&req.method, &req.path) {
                Ok(r) => assert!(req.path.ends_with(r.name)),
                Err(e) => {
                    let bytes = Response::error(e.status(), &e).to_bytes();
                    assert!(bytes.starts_with(b"HTTP/1.1 40"));
                }
            }
        }
        Err(e) => {
            let status = e.status();
            assert!((400..600).contains(&status), "{e:?} -> {status}");
            let bytes = Response::error(status, &e).to_bytes();
            assert!(bytes.starts_with(b"HTTP/1.1 "));
        }
    }
});
