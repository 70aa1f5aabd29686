//! Encode, then decode: `migrate::migrate` must reproduce the source's
//! memory exactly on a fresh destination.
//!
//! A source list of one to three blocks (some resizable) gets arbitrary page
//! contents: zero pages, filled pages, pages with one non-zero byte, and
//! patterned pages. The real sender runs with [`SoftwareOnly`] as the dirty
//! log, writing the stream into a `Vec<u8>` and reading an `ACK_OK`
//! acknowledgement from a [`SliceReader`]; between passes a scripted guest
//! writes pages and resizes blocks (through the list, so the writes are
//! logged and the resizes travel as records). The destination has the same
//! blocks at other used lengths, filled with a guard pattern, and receives
//! the stream; then the used length and every byte of every block must equal
//! the source's, the receive must end exactly at the stream's end, and the
//! receiver's counts must equal the sender's.

use crate::{holds, same, Mismatch, Ops};
use arbitrary::Arbitrary;
use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::bitmap::Owned;
use ramblock_core::block::{BlockBitmaps, BlockSpec};
use ramblock_core::buffer::BufferMemory;
use ramblock_core::dirty_log::SoftwareOnly;
use ramblock_core::flags::BlockFlags;
use ramblock_core::list::RamList;
use ramblock_core::migrate::receiver::{Receiver, BOUNCE_BYTES};
use ramblock_core::migrate::{self, MigrationHost, MigrationStats, PassReport, PrecopyConfig};
use ramblock_core::name::BlockName;
use ramblock_core::stream::format::{ACK_OK, RUNNING};
use ramblock_core::stream::io::SliceReader;

const PAGE: usize = 4096;
/// The lists' capacity.
pub const CAPACITY: usize = 4;
/// The blocks' names, in the order they are added.
pub const NAMES: [&str; 3] = ["pc.ram", "vga", "0000:00:03.0/rom"];

/// Host memory over a boxed buffer.
pub type Mem = BufferMemory<Box<[u8]>>;
/// The lists both sides use.
pub type List = RamList<'static, Mem, Owned, CAPACITY>;

/// What a page holds.
#[derive(Arbitrary, Copy, Clone, Debug)]
pub enum PageFill {
    /// All zero (travels as a count).
    Zero,
    /// Every byte the same (zero when the byte is).
    Byte(u8),
    /// Zero but for one byte (a zero page when the byte is).
    Sparse {
        /// Where.
        at: u16,
        /// What.
        byte: u8,
    },
    /// A pattern from a seed.
    Pattern(u32),
}

impl PageFill {
    /// The page's bytes.
    pub fn bytes(self) -> Vec<u8> {
        match self {
            PageFill::Zero => vec![0; PAGE],
            PageFill::Byte(b) => vec![b; PAGE],
            PageFill::Sparse { at, byte } => {
                let mut p = vec![0; PAGE];
                p[usize::from(at) % PAGE] = byte;
                p
            }
            PageFill::Pattern(seed) => (0..PAGE as u32)
                .map(|i| (i.wrapping_mul(seed | 1) >> 7) as u8)
                .collect(),
        }
    }
}

/// A block on both sides.
#[derive(Arbitrary, Copy, Clone, Debug)]
pub struct Shape {
    /// Source used length: `1 + v % 40` pages.
    pub used_pages: u8,
    /// Resizable, with this many pages past the used length (`v % 24`).
    pub resizable: Option<u8>,
    /// Destination used length for a resizable block: `1 + v % max`.
    pub dest_used_pages: u8,
}

impl Shape {
    /// (used, max) in pages on the source, and the destination's used pages.
    pub fn pages(&self) -> (u64, u64, u64) {
        let used = 1 + u64::from(self.used_pages) % 40;
        match self.resizable {
            Some(extra) => {
                let max = used + u64::from(extra) % 24;
                (used, max, 1 + u64::from(self.dest_used_pages) % max)
            }
            None => (used, used, used),
        }
    }
}

/// What the scripted guest does after a live pass.
#[derive(Arbitrary, Copy, Clone, Debug)]
pub enum Action {
    /// Writes a page of a block (ignored past its used length).
    Write {
        /// Block index (modulo the block count).
        block: u8,
        /// Page.
        page: u8,
        /// Contents.
        fill: PageFill,
    },
    /// Resizes a block (refusals are ignored).
    Resize {
        /// Block index.
        block: u8,
        /// New used length in pages.
        pages: u8,
    },
}

/// One scripted step: after live pass `pass % max_passes`, do `action`.
#[derive(Arbitrary, Copy, Clone, Debug)]
pub struct Step {
    /// The pass after which it happens.
    pub pass: u8,
    /// What happens.
    pub action: Action,
}

/// A whole case.
#[derive(Arbitrary, Clone, Debug)]
pub struct Input {
    /// The blocks (`1 + block_count % 3` of them are used).
    pub shapes: [Shape; 3],
    /// How many of `shapes` exist.
    pub block_count: u8,
    /// Pass limit: `1 + v % 4`.
    pub max_passes: u8,
    /// Initial contents: (block, page, fill).
    pub initial: Vec<(u8, u8, PageFill)>,
    /// The guest's writes and resizes between passes.
    pub script: Ops<Step>,
}

/// Adds `name` with `used`/`max` pages and `flags` to `list`, filled with
/// `fill(page)`.
pub fn add_block(
    list: &List,
    name: &str,
    used: u64,
    max: u64,
    flags: BlockFlags,
    fill: impl Fn(usize) -> u8,
) -> Result<(), String> {
    let mut buf = vec![0u8; max as usize * PAGE].into_boxed_slice();
    for (page, bytes) in buf.chunks_mut(PAGE).enumerate() {
        bytes.fill(fill(page));
    }
    let used = ByteLen(used * PAGE as u64);
    let mem = BufferMemory::new(buf, used, PageSize::SIZE_4K).map_err(|e| e.to_string())?;
    let mut spec = BlockSpec::new(BlockName::new(name).map_err(|e| e.to_string())?, used);
    spec.max_length = ByteLen(max * PAGE as u64);
    spec.flags = flags;
    let bitmaps = BlockBitmaps::for_spec(&spec).map_err(|e| e.to_string())?;
    list.add(spec, mem, bitmaps).map_err(|r| r.to_string())?;
    Ok(())
}

/// Writes `fill` to page `page` of the `block`-th block (by offset order);
/// a page past the used length is ignored.
pub fn write_page(list: &List, block: usize, page: usize, fill: PageFill) {
    let view = list.read();
    if let Some(b) = view.iter().nth(block % view.len().max(1)) {
        let _ = b.write(ByteLen((page * PAGE) as u64), &fill.bytes());
    }
}

/// The migration's surroundings: a fake clock and a scripted guest that
/// acts only while it runs (never after `pause_guest`).
struct Host<'a> {
    list: &'a List,
    clock: u64,
    paused: bool,
    max_passes: u32,
    script: &'a [Step],
}

impl MigrationHost for Host<'_> {
    fn now_ns(&mut self) -> u64 {
        self.clock += 1_000;
        self.clock
    }

    fn sleep_ns(&mut self, ns: u64) {
        self.clock += ns;
    }

    fn pause_guest(&mut self) {
        self.paused = true;
    }

    fn resume_guest(&mut self) {
        self.paused = false;
    }

    fn set_throttle(&mut self, _percent: u8) {}

    fn pass_done(&mut self, report: &PassReport) {
        if self.paused {
            return;
        }
        for step in self.script {
            if u32::from(step.pass) % self.max_passes != report.pass {
                continue;
            }
            match step.action {
                Action::Write { block, page, fill } => {
                    write_page(self.list, usize::from(block), usize::from(page), fill)
                }
                Action::Resize { block, pages } => {
                    let name = {
                        let view = self.list.read();
                        view.iter()
                            .nth(usize::from(block) % view.len().max(1))
                            .map(|b| b.name().to_string())
                    };
                    if let Some(name) = name {
                        let len = (u64::from(pages) % 64) * PAGE as u64;
                        let _ = self.list.resize(&name, ByteLen(len));
                    }
                }
            }
        }
    }
}

/// Runs the real sender over `list` with `script` between passes, into a
/// byte vector.
pub fn send(
    list: &List,
    max_passes: u32,
    script: &[Step],
) -> Result<(Vec<u8>, MigrationStats), String> {
    let mut out = Vec::new();
    // The acknowledgement, then the handover: the destination runs.
    let mut ack_bytes = [0u8; 16];
    ack_bytes[..4].copy_from_slice(&ACK_OK);
    ack_bytes[8..12].copy_from_slice(&RUNNING);
    let mut ack = SliceReader::new(&ack_bytes);
    let mut host = Host {
        list,
        clock: 0,
        paused: false,
        max_passes,
        script,
    };
    let cfg = PrecopyConfig {
        downtime_limit_ns: 0,
        max_passes,
        bandwidth_limit: None,
        auto_converge: true,
        postcopy_after: None,
    };
    let stats = with_buffers(|buf, _| {
        migrate::migrate(
            list,
            &mut SoftwareOnly,
            &mut out,
            &mut ack,
            &mut host,
            cfg,
            buf,
        )
    })
    .map_err(|e| format!("migrate failed: {e}"))?;
    Ok((out, stats))
}

thread_local! {
    /// Staging buffers reused across runs: allocating 256 KiB twice per
    /// input dominated the fuzzer's time under AddressSanitizer.
    static BUFFERS: std::cell::RefCell<[Vec<u8>; 2]> =
        std::cell::RefCell::new([vec![0; BOUNCE_BYTES], vec![0; BOUNCE_BYTES]]);
}

/// Runs `f` with a sender buffer and a receiver bounce buffer, each
/// [`BOUNCE_BYTES`] long.
pub fn with_buffers<R>(f: impl FnOnce(&mut [u8], &mut [u8]) -> R) -> R {
    BUFFERS.with(|b| {
        let mut b = b.borrow_mut();
        let [send, receive] = &mut *b;
        f(send, receive)
    })
}

/// The guard pattern a destination page starts with (never zero).
pub fn guard(block: usize, page: usize) -> u8 {
    0xA5 ^ ((block * 16 + page) as u8 & 0x5A) | 1
}

/// Runs `input`: send, receive, compare.
pub fn check(input: &Input) -> Result<(), Mismatch> {
    let harness = |what: String| Mismatch {
        step: None,
        what: format!("harness: {what}"),
    };
    let count = 1 + usize::from(input.block_count) % 3;
    let source = List::new();
    let dest = List::new();
    for (i, shape) in input.shapes[..count].iter().enumerate() {
        let (used, max, dest_used) = shape.pages();
        let flags = if shape.resizable.is_some() {
            BlockFlags::MIGRATABLE | BlockFlags::RESIZABLE
        } else {
            BlockFlags::MIGRATABLE
        };
        add_block(&source, NAMES[i], used, max, flags, |_| 0).map_err(harness)?;
        add_block(&dest, NAMES[i], dest_used, max, flags, |p| guard(i, p)).map_err(harness)?;
    }
    for &(block, page, fill) in &input.initial {
        write_page(&source, usize::from(block), usize::from(page), fill);
    }
    let max_passes = 1 + u32::from(input.max_passes) % 4;
    let (stream, stats) = send(&source, max_passes, &input.script).map_err(|e| Mismatch {
        step: None,
        what: e,
    })?;

    let mut reader = SliceReader::new(&stream);
    let summary = with_buffers(|_, bounce| {
        let mut receiver = Receiver::new(bounce).map_err(|e| harness(e.to_string()))?;
        receiver
            .receive(&dest, &mut reader, |_| {})
            .map_err(|e| Mismatch {
                step: None,
                what: format!("the receiver refused the sender's stream: {e}"),
            })
    })?;
    same(
        None,
        "bytes left after the end record",
        reader.remaining(),
        0,
    )?;
    same(
        None,
        "pages received (normal, zero) vs sent",
        (summary.pages, summary.zero_pages),
        (stats.pages, stats.zero_pages),
    )?;
    same(
        None,
        "passes received vs sent",
        summary.passes,
        stats.passes,
    )?;
    same(None, "blocks verified", summary.blocks as usize, count)?;

    let (src, dst) = (source.read(), dest.read());
    for (s, d) in src.iter().zip(dst.iter()) {
        same(None, "block order", d.name(), s.name())?;
        same(
            None,
            format_args!("{} used length", s.name()),
            d.used_length(),
            s.used_length(),
        )?;
        let len = s.used_length().0 as usize;
        let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
        s.read(ByteLen(0), &mut a)
            .map_err(|e| harness(e.to_string()))?;
        d.read(ByteLen(0), &mut b)
            .map_err(|e| harness(e.to_string()))?;
        if let Some(at) = a.iter().zip(&b).position(|(x, y)| x != y) {
            return holds(
                None,
                false,
                format_args!(
                    "{}: destination differs from the source at byte {at:#x} (page {}): {:#04x} vs {:#04x}",
                    s.name(),
                    at / PAGE,
                    b[at],
                    a[at]
                ),
            );
        }
    }
    Ok(())
}

/// The fuzz entry point; panics with a reproducer on a mismatch.
pub fn fuzz(data: &[u8]) {
    crate::run_bytes(data, check);
}
