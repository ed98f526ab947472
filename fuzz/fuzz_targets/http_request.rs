//! The API socket's request path on arbitrary bytes: Ferry's framing and checks around
//! micro_http's request parser, then the router and micro_http's response writer. It never
//! panics; what it accepts is self-delimiting (the same request from exactly its own bytes,
//! every shorter prefix only "incomplete"); every answer, accepted or refused, reads back
//! as cloud-hypervisor's client reads it (`HTTP/1.1 CODE ` then CRLF, a JSON array body).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::api::client::parse_reply;
use vmm::api::http::{parse_request, ParseError, Response, MAX_BODY};
use vmm::api::routes;

/// Writes `r` and reads it back: the status line and the error body must survive.
fn check_answer(r: &Response) {
    let bytes = r.to_bytes();
    assert!(
        bytes.starts_with(format!("HTTP/1.1 {} \r\n", r.status).as_bytes()),
        "{:?}",
        String::from_utf8_lossy(&bytes)
    );
    let (reply, used) = parse_reply(&bytes, true)
        .expect("the answer parses")
        .expect("the answer is complete");
    assert_eq!(used, bytes.len());
    assert_eq!(reply.status, r.status);
    let messages: Vec<String> = serde_json::from_slice(&reply.body).expect("a JSON array body");
    assert_eq!(messages.len(), 1);
}

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
                    assert!((400..500).contains(&e.status()));
                    let mut r = Response::error(e.status(), &e);
                    if let routes::RouteError::MethodNotAllowed { allowed, .. } = e {
                        r.allow = Some(allowed);
                    }
                    check_answer(&r);
                }
            }
        }
        Err(e) => {
            let status = e.status();
            assert!((400..600).contains(&status), "{e:?} -> {status}");
            let mut r = Response::error(status, &e);
            r.close = true;
            check_answer(&r);
        }
    }
});
