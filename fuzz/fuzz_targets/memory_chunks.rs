//! Memory chunks as the destination takes them apart: every chunk the decoder accepts
//! must split into runs (`MemoryChunk::runs`) and expand (`SparseChunk::expand`) without
//! panicking, and what comes out must add up — runs cover exactly `page_count` pages in
//! address order and hand out exactly the data the chunk carried; an expanded sparse
//! chunk has one whole page per bit of its data map.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_migration::protocol::{Message, MessageReader, PageRun};

const PAGE: u64 = 4096;

fuzz_target!(|data: &[u8]| {
    let mut reader = MessageReader::new(data);
    while let Ok(msg) = reader.read_message() {
        match msg {
            Message::MemoryChunk(c) => {
                let (mut pages, mut bytes) = (0u64, 0usize);
                let mut next = c.gpa;
                for run in c.runs() {
                    match run {
                        PageRun::Zero { gpa, pages: n } => {
                            assert_eq!(gpa, next);
                            assert!(n > 0);
                            pages += u64::from(n);
                            next = gpa + u64::from(n) * PAGE;
                        }
                        PageRun::Data { gpa, data } => {
                            assert_eq!(gpa, next);
                            assert!(!data.is_empty() && data.len() as u64 % PAGE == 0);
                            pages += data.len() as u64 / PAGE;
                            bytes += data.len();
                            next = gpa + data.len() as u64;
                        }
                    }
                }
                assert_eq!(pages, u64::from(c.page_count));
                assert_eq!(bytes, c.data.len());
                assert_eq!(c.data_pages() + c.zero_pages(), c.page_count);
            }
            Message::SparseChunk(c) => {
                let (mut pages, mut map) = (Vec::new(), Vec::new());
                let n = c.expand(&mut pages, &mut map);
                let set: u32 = map.iter().map(|b| b.count_ones()).sum();
                assert_eq!(set, n);
                assert_eq!(pages.len() as u64, u64::from(n) * PAGE);
                assert_eq!(map.len(), (c.page_count as usize).div_ceil(8));
            }
            _ => {}
        }
    }
});
