//! How many inputs of a corpus get past a target's parser, to tell whether fuzzing reached
//! the accept paths (libFuzzer's cov/ft figures do not say it):
//!
//! ```text
//! cd fuzz && cargo run --example count_accepted -- TARGET CORPUS_DIR
//! ```
//!
//! TARGET is http_request, api_body or migration_stream. Prints the inputs, those
//! accepted (per parser for api_body; for migration_stream those with at least one message
//! decoded and those with a memory or sparse chunk carrying a data page, whose crc32c
//! therefore passed).

use std::path::PathBuf;

use vm_migration::protocol::{Message, MessageReader};

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(target), Some(dir)) = (args.next(), args.next()) else {
        eprintln!("usage: count_accepted http_request|api_body|migration_stream CORPUS_DIR");
        std::process::exit(2);
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let inputs: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let count = |f: &dyn Fn(&[u8]) -> bool| inputs.iter().filter(|d| f(d)).count();
    print!("{target} {dir}: {} inputs", inputs.len());
    match target.as_str() {
        "http_request" => {
            let ok = count(&|d| vmm::api::http::parse_request(d).is_ok());
            let routed = count(&|d| match vmm::api::http::parse_request(d) {
                Ok((req, _)) => vmm::api::routes::route(&req.method, &req.path).is_ok(),
                Err(_) => false,
            });
            println!(", {ok} parsed as a request, {routed} of them routed to an endpoint");
        }
        "api_body" => {
            use vmm::api::migration;
            let objects = count(&|d| {
                matches!(
                    serde_json::from_slice::<serde_json::Value>(d),
                    Ok(serde_json::Value::Object(_))
                )
            });
            let config = count(&|d| vmm::api::parse_vm_config(d).is_ok());
            let send = count(&|d| migration::parse_send_migration(d).is_ok());
            let receive = count(&|d| migration::parse_receive_migration(d).is_ok());
            let coredump = count(&|d| vmm::api::parse_coredump(d).is_ok());
            println!(
                ", {objects} JSON objects; accepted: vm.create {config}, send-migration {send}, \
                 receive-migration {receive}, coredump {coredump}"
            );
        }
        "migration_stream" => {
            let decoded = count(&|d| MessageReader::new(d).read_message().is_ok());
            let data_page = count(&|d| {
                let mut r = MessageReader::new(d);
                loop {
                    match r.read_message() {
                        Ok(Message::MemoryChunk(c)) if c.data_pages() > 0 => return true,
                        Ok(Message::SparseChunk(c)) => {
                            let (mut pages, mut map) = (Vec::new(), Vec::new());
                            if c.expand(&mut pages, &mut map) > 0 {
                                return true;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => return false,
                    }
                }
            });
            println!(
                ", {decoded} with a message decoded, {data_page} with a data page past its crc32c"
            );
        }
        other => {
            eprintln!("\nunknown target {other}");
            std::process::exit(2);
        }
    }
}
