//! A destination that floods the source with page requests (valid ones and
//! duplicates of pages sent long ago) slows post-copy down but cannot stop
//! it: the engine answers a bounded batch of requests, then sends a
//! background chunk, so the migration completes while the flood is still
//! going, and the stream it wrote leaves the destination equal to the
//! source (checked by receiving it). And a request that arrives while
//! background pages go out waits behind at most one small chunk.
mod common;
use common::{add_buffer_block, add_buffer_block_with_page_size, Mem};

use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::bitmap::Owned;
use ramblock_core::block::BlockSpec;
use ramblock_core::buffer::BufferError;
use ramblock_core::dirty_log::SoftwareOnly;
use ramblock_core::list::RamList;
use ramblock_core::migrate::postcopy::REQUESTS_PER_BACKGROUND;
use ramblock_core::migrate::{
    migrate, MigrationHost, PostcopyTarget, PrecopyConfig, ReceiveEvent, Receiver, ReturnEvent,
    BOUNCE_BYTES,
};
use ramblock_core::name::BlockName;
use ramblock_core::region::HostRegion;
use ramblock_core::stream::format::{PageRequest, ReturnMessage};
use ramblock_core::stream::io::{IoStream, SliceReader};

type List = RamList<'static, Mem, Owned, 4>;

const PAGE: u64 = 4096;
const HUGE: u64 = 2 << 20;
const RAM_PAGES: u64 = 2048;
const HUGEPAGES: u64 = 2;
/// Requests the destination has queued when post-copy starts.
const FLOOD: u64 = 300_000;

fn blocks(list: &List, fill: u8) {
    let name = |n| BlockName::new(n).unwrap();
    add_buffer_block(
        list,
        BlockSpec::new(name("pc.ram"), ByteLen(RAM_PAGES * PAGE)),
        fill,
    );
    add_buffer_block_with_page_size(
        list,
        BlockSpec::new(name("hugeram"), ByteLen(HUGEPAGES * HUGE)),
        fill,
        PageSize::SIZE_2M,
    );
}

fn contents(list: &List) -> Vec<Vec<u8>> {
    let view = list.read();
    view.iter()
        .map(|b| {
            let mut v = vec![0u8; b.used_length().0 as usize];
            b.read(ByteLen::ZERO, &mut v).unwrap();
            v
        })
        .collect()
}

/// The source's host: the return path holds `left` requests, most of them
/// for page 0 of "pc.ram" (sent with the first answer, so duplicates), the
/// rest spread over both blocks. The acknowledgement comes once the engine
/// waits for it (after its end record).
struct Flooding {
    left: u64,
    taken: u64,
    /// Requests still queued when the engine wrote its end record.
    left_at_end: Option<u64>,
}

impl MigrationHost for Flooding {
    fn now_ns(&mut self) -> u64 {
        0
    }
    fn sleep_ns(&mut self, _: u64) {}
    fn pause_guest(&mut self) {}
    fn resume_guest(&mut self) {
        panic!("the guest belongs to the destination once post-copy started");
    }
    fn set_throttle(&mut self, _: u8) {}
    fn return_message(&mut self, wait_ns: u64) -> ReturnEvent {
        if wait_ns > 0 {
            // Only the wait for the acknowledgement waits.
            self.left_at_end.get_or_insert(self.left);
            return ReturnEvent::Message(ReturnMessage::Ack(Ok(())));
        }
        if self.left == 0 {
            return ReturnEvent::Nothing;
        }
        self.left -= 1;
        self.taken += 1;
        let i = self.taken;
        let request = if i % 5 == 0 {
            // Spread: a hugepage block request is widened to its hugepage.
            let block = (i / 5 % 2) as u32;
            let pages = if block == 0 {
                RAM_PAGES
            } else {
                HUGEPAGES * HUGE / PAGE
            };
            PageRequest {
                block,
                first: (i * 7919) % pages,
                count: 1,
            }
        } else {
            PageRequest {
                block: 0,
                first: 0,
                count: 1,
            }
        };
        ReturnEvent::Message(ReturnMessage::Request(request))
    }
}

/// Places pages straight into the destination blocks.
struct Place<'a>(Vec<(String, HostRegion<'a>)>);

impl Place<'_> {
    fn region(&self, block: &str) -> HostRegion<'_> {
        self.0.iter().find(|(n, _)| n == block).unwrap().1
    }
}

impl PostcopyTarget for Place<'_> {
    type Error = BufferError;
    fn start(&mut self, _: &[&str]) -> Result<(), BufferError> {
        Ok(())
    }
    fn place(&mut self, block: &str, offset: ByteLen, data: &[u8]) -> Result<(), BufferError> {
        self.region(block).write(offset, data).unwrap();
        Ok(())
    }
    fn place_zero(
        &mut self,
        block: &str,
        offset: ByteLen,
        len: ByteLen,
    ) -> Result<(), BufferError> {
        self.region(block).fill(offset, len.0 as usize, 0).unwrap();
        Ok(())
    }
    fn resumed(&mut self) -> Result<(), BufferError> {
        Ok(())
    }
}

#[test]
fn a_request_flood_still_lets_background_pages_out_and_the_migration_completes() {
    let src = List::new();
    blocks(&src, 0);
    {
        let view = src.read();
        for (i, b) in view.iter().enumerate() {
            for p in 0..b.used_pages() as u64 {
                // Every page distinct; every seventh page zero.
                if p % 7 != 3 {
                    let stamp = [(i as u64) << 56 | p; 4];
                    let bytes: Vec<u8> = stamp.iter().flat_map(|w| w.to_le_bytes()).collect();
                    b.write(ByteLen(p * PAGE + 8 * (p % 500)), &bytes).unwrap();
                }
            }
        }
    }
    let mut host = Flooding {
        left: FLOOD,
        taken: 0,
        left_at_end: None,
    };
    let mut stream = Vec::new();
    let mut buf = vec![0u8; 64 * PAGE as usize];
    let cfg = PrecopyConfig {
        downtime_limit_ns: 0,
        postcopy_after: Some(0),
        ..PrecopyConfig::default()
    };
    let stats = migrate(
        &src,
        &mut SoftwareOnly,
        &mut stream,
        &mut IoStream(std::io::empty()),
        &mut host,
        cfg,
        &mut buf,
    )
    .unwrap();
    let pc = stats.postcopy.expect("the migration ended in post-copy");
    let left = host.left_at_end.expect("the engine waited for the ack");
    assert!(
        left > FLOOD / 2,
        "the migration ended while the flood went on: {left} of {FLOOD} requests still queued"
    );
    assert!(pc.background_pages > 0, "{pc:?}");
    assert_eq!(
        pc.requested_pages + pc.background_pages,
        RAM_PAGES + HUGEPAGES * HUGE / PAGE,
        "every page went out once: {pc:?}"
    );
    assert!(pc.duplicate_requests > 0, "{pc:?}");
    // Each request taken was answered or dropped before the next batch.
    assert_eq!(pc.requests, FLOOD - left, "{pc:?}");
    assert!(pc.requests >= REQUESTS_PER_BACKGROUND as u64, "{pc:?}");

    // What the engine wrote is a good stream: it leaves the destination
    // equal to the source.
    let dst = List::new();
    blocks(&dst, 0xEE);
    let mut target = Place(
        dst.read()
            .iter()
            // SAFETY: `dst` outlives the target and no block is removed or
            // shrunk while it places pages.
            .map(|b| (b.name().to_string(), unsafe { b.region().detach() }))
            .collect(),
    );
    let mut bounce = vec![0u8; BOUNCE_BYTES];
    let mut huge = vec![0u8; HUGE as usize];
    let mut events = Vec::new();
    let summary = Receiver::new(&mut bounce)
        .unwrap()
        .with_hugepage_buffer(&mut huge)
        .receive_postcopy(&dst, &mut SliceReader::new(&stream), &mut target, |e| {
            events.push(e)
        })
        .unwrap();
    assert!(events.contains(&ReceiveEvent::PostcopyStarted));
    assert_eq!(summary.blocks, 2);
    assert!(contents(&src) == contents(&dst), "destination differs");
}

/// Counts what the engine wrote, so its host can tell how much went out
/// between two looks at the return path.
struct Counting<'a> {
    bytes: &'a std::cell::Cell<u64>,
}

impl ramblock_core::stream::io::ByteWrite for Counting<'_> {
    type Error = std::convert::Infallible;
    fn write_all(&mut self, buf: &[u8]) -> Result<(), Self::Error> {
        self.bytes.set(self.bytes.get() + buf.len() as u64);
        Ok(())
    }
}

/// The source's host with one request waiting now and then: records how
/// many bytes the engine wrote between two looks at the return path while
/// no request was answered (background only), and acknowledges at the end.
struct Looking<'a> {
    bytes: &'a std::cell::Cell<u64>,
    at_last_look: u64,
    looks: u64,
    /// The most written between two looks that took no request.
    most_between_looks: u64,
    requests_left: u64,
}

impl MigrationHost for Looking<'_> {
    fn now_ns(&mut self) -> u64 {
        0
    }
    fn sleep_ns(&mut self, _: u64) {}
    fn pause_guest(&mut self) {}
    fn resume_guest(&mut self) {
        panic!("the guest belongs to the destination once post-copy started");
    }
    fn set_throttle(&mut self, _: u8) {}
    fn return_message(&mut self, wait_ns: u64) -> ReturnEvent {
        if wait_ns > 0 {
            return ReturnEvent::Message(ReturnMessage::Ack(Ok(())));
        }
        let written = self.bytes.get() - self.at_last_look;
        self.at_last_look = self.bytes.get();
        self.looks += 1;
        // Every 50th look: a request for a page far ahead of the cursor,
        // as a faulting vCPU would send.
        if self.looks % 50 == 0 && self.requests_left > 0 {
            self.requests_left -= 1;
            return ReturnEvent::Message(ReturnMessage::Request(PageRequest {
                block: 0,
                first: (self.looks * 37) % RAM_PAGES,
                count: 1,
            }));
        }
        self.most_between_looks = self.most_between_looks.max(written);
        ReturnEvent::Nothing
    }
}

#[test]
fn a_request_waits_behind_at_most_one_small_background_chunk() {
    use ramblock_core::migrate::postcopy::BACKGROUND_CHUNK_PAGES;
    let src = List::new();
    add_buffer_block(
        &src,
        BlockSpec::new(BlockName::new("pc.ram").unwrap(), ByteLen(RAM_PAGES * PAGE)),
        0x5A,
    );
    let bytes = std::cell::Cell::new(0);
    let mut host = Looking {
        bytes: &bytes,
        at_last_look: 0,
        looks: 0,
        most_between_looks: 0,
        requests_left: 10,
    };
    let mut buf = vec![0u8; 64 * PAGE as usize];
    let cfg = PrecopyConfig {
        downtime_limit_ns: 0,
        postcopy_after: Some(0),
        ..PrecopyConfig::default()
    };
    let stats = migrate(
        &src,
        &mut SoftwareOnly,
        &mut Counting { bytes: &bytes },
        &mut IoStream(std::io::empty()),
        &mut host,
        cfg,
        &mut buf,
    )
    .unwrap();
    let pc = stats.postcopy.expect("the migration ended in post-copy");
    assert_eq!(
        pc.requested_pages + pc.background_pages,
        RAM_PAGES,
        "{pc:?}"
    );
    assert!(pc.requested_pages > 0, "{pc:?}");
    // Every page is non-zero, so a chunk is its pages plus one record
    // header; between two looks the engine wrote at most one chunk (the
    // first look also covers the header, table, discards and Postcopy
    // record: a few hundred bytes).
    let chunk = BACKGROUND_CHUNK_PAGES as u64 * PAGE;
    assert!(
        host.most_between_looks >= chunk && host.most_between_looks < chunk + PAGE,
        "{} bytes went out between two looks at the return path; a chunk is {chunk}",
        host.most_between_looks
    );
}
