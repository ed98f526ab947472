//! Memory chunks as the destination takes them apart: every chunk the decoder accepts
//! must split into runs (`MemoryChunk::runs`) and expand (`SparseChunk::expand`) without
//! panicking, and what comes out must add up — runs cover exactly `page_count` pages in
//! address order and hand out exactly the data the chunk carried; an expanded sparse
//! chunk has one whole page per bit of its data map; a page chunk, streamed or decoded
//! whole, hands its sink each of its pages exactly once, inside the chunk, and ends once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_migration::protocol::{
    Message, MessageReader, PageChunkDone, PageRun, PageSink, ProtocolError,
};

const PAGE: u64 = 4096;

/// Checks what a page chunk hands out: pages in order, inside the announced chunk.
#[derive(Default)]
struct Checker {
    chunk: Option<(u64, u32)>,
    next: u64,
    ends: u32,
}

impl Checker {
    fn take(&mut self, gpa: u64, len: u64) {
        let (start, count) = self.chunk.expect("pages before begin");
        assert_eq!(gpa, self.next);
        assert!(len > 0 && len % PAGE == 0);
        assert!(gpa + len <= start + u64::from(count) * PAGE);
        self.next = gpa + len;
    }
}

impl PageSink for Checker {
    type Error = ProtocolError;
    fn begin(&mut self, gpa: u64, page_count: u32) -> Result<(), ProtocolError> {
        self.chunk = Some((gpa, page_count));
        self.next = gpa;
        Ok(())
    }
    fn whole_pages(
        &mut self,
        gpa: u64,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<(), ProtocolError>,
    ) -> Result<(), ProtocolError> {
        self.take(gpa, len as u64);
        fill(&mut vec![0u8; len])
    }
    fn zero_pages(&mut self, gpa: u64, pages: u32) -> Result<(), ProtocolError> {
        self.take(gpa, u64::from(pages) * PAGE);
        Ok(())
    }
    fn end(&mut self, done: PageChunkDone) -> Result<(), ProtocolError> {
        let (start, count) = self.chunk.expect("end before begin");
        assert_eq!((done.gpa, done.page_count), (start, count));
        assert_eq!(self.next, start + u64::from(count) * PAGE);
        assert_eq!(done.zero_pages + done.data_pages, count);
        self.ends += 1;
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    // Streamed, as the destination reads them.
    let mut reader = MessageReader::new(data);
    loop {
        let mut sink = Checker::default();
        match reader.read_message_with(&mut sink) {
            Ok(None) => assert_eq!(sink.ends, 1),
            Ok(Some(_)) => assert_eq!(sink.ends, 0),
            Err(_) => {
                assert_eq!(sink.ends, 0);
                break;
            }
        }
    }
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
            Message::PageChunk(c) => {
                let mut sink = Checker::default();
                c.apply(&mut sink).expect("a decoded page chunk applies");
                assert_eq!(sink.ends, 1);
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
