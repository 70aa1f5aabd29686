//! Every malformed stream gets its own typed error, pages outside the
//! records already accepted are never written, and a receive can start again
//! after an error.
mod common;
use common::add_buffer_block;

use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::bitmap::Owned;
use ramblock_core::block::{BlockBitmaps, BlockSpec};
use ramblock_core::checksum::{finish_sum, page_digest, Ledger};
use ramblock_core::flags::BlockFlags;
use ramblock_core::list::RamList;
use ramblock_core::migrate::receiver::{ReceiveError, ReceiveSummary, Receiver, BOUNCE_BYTES};
use ramblock_core::name::BlockName;
use ramblock_core::stream::format::{Header, Record, TableEntry, MAX_RUN_PAGES};
use ramblock_core::stream::io::{ByteWrite, SliceReader};
use std::convert::Infallible;

use common::Mem;
type List = RamList<'static, Mem, Owned, 4>;
const PAGE: u64 = 4096;
const GUARD: u8 = 0xA5;

/// A destination: "ram" of 8 pages and a resizable "vram" of 2 (max 4),
/// all filled with a guard byte so any stray write shows.
fn dest() -> List {
    let list = List::new();
    for (name, pages, max, flags) in [
        ("ram", 8, 8, BlockFlags::MIGRATABLE),
        ("vram", 2, 4, BlockFlags::MIGRATABLE | BlockFlags::RESIZABLE),
    ] {
        let spec = BlockSpec {
            max_length: ByteLen(max * PAGE),
            ..BlockSpec::new(BlockName::new(name).unwrap(), ByteLen(pages * PAGE)).flags(flags)
        };
        add_buffer_block(&list, spec, GUARD);
    }
    list
}

fn table(out: &mut Vec<u8>, entries: &[(&str, u64)]) {
    Header::new(entries.len() as u32).write(out).unwrap();
    for (name, pages) in entries {
        TableEntry {
            used_length: pages * PAGE,
            page_size: PAGE,
            flags: 0,
        }
        .write(name, out)
        .unwrap();
    }
}

fn good_table(out: &mut Vec<u8>) {
    table(out, &[("ram", 8), ("vram", 2)]);
}

fn pages(out: &mut Vec<u8>, block: u32, first: u64, count: u32, byte: u8) {
    Record::Pages {
        block,
        first,
        count,
    }
    .write(out)
    .unwrap();
    out.write_all(&vec![byte; (count as u64 * PAGE) as usize])
        .unwrap();
}

fn receive(
    list: &List,
    stream: &[u8],
) -> Result<ReceiveSummary, ReceiveError<Infallible, ramblock_core::buffer::BufferError>> {
    let mut bounce = vec![0u8; BOUNCE_BYTES];
    Receiver::new(&mut bounce)
        .unwrap()
        .receive(list, &mut SliceReader::new(stream), |_| {})
}

/// Every page of every block: (block, page, first byte, all bytes equal).
fn pages_of(list: &List) -> Vec<(String, u64, u8, bool)> {
    let view = list.read();
    let mut v = vec![];
    for b in view.iter() {
        for p in 0..b.used_pages() as u64 {
            let mut buf = vec![0u8; PAGE as usize];
            b.read(ByteLen(p * PAGE), &mut buf).unwrap();
            v.push((
                b.name().to_string(),
                p,
                buf[0],
                buf.iter().all(|&x| x == buf[0]),
            ));
        }
    }
    v
}

fn expect(stream: Vec<u8>, want: &str) {
    let list = dest();
    let err = receive(&list, &stream).unwrap_err();
    assert_eq!(err.to_string(), want);
}

#[test]
fn bad_magic() {
    expect(
        b"NOTRAMBLOCK.....".to_vec(),
        "not a ramblock migration stream (bad magic)",
    );
}

#[test]
fn unsupported_version() {
    let mut s = vec![];
    Header {
        version: 9,
        ..Header::new(0)
    }
    .write(&mut s)
    .unwrap();
    expect(s, "stream version 9 is not supported (this build reads 2)");
    // Version 1 had no handover: its source would not wait for one.
    let mut s = vec![];
    Header {
        version: 1,
        ..Header::new(0)
    }
    .write(&mut s)
    .unwrap();
    expect(s, "stream version 1 is not supported (this build reads 2)");
}

#[test]
fn target_page_size_mismatch() {
    let mut s = vec![];
    Header {
        page_shift: 16,
        ..Header::new(0)
    }
    .write(&mut s)
    .unwrap();
    expect(s, "source target page is 2^16 bytes, destination uses 2^12");
}

#[test]
fn too_many_blocks() {
    let mut s = vec![];
    Header::new(5).write(&mut s).unwrap();
    expect(
        s,
        "the stream names 5 blocks, more than the destination can hold",
    );
}

#[test]
fn bad_block_name() {
    let mut s = vec![];
    Header::new(1).write(&mut s).unwrap();
    s.extend_from_slice(&[2, 0xff, 0xfe]);
    s.extend_from_slice(&[0; 20]);
    expect(
        s,
        "a block name in the stream is empty, not UTF-8, or contains NUL",
    );
}

#[test]
fn unknown_block() {
    let mut s = vec![];
    table(&mut s, &[("rom", 1)]);
    expect(s, "block \"rom\" does not exist on the destination");
}

#[test]
fn duplicate_block() {
    let mut s = vec![];
    table(&mut s, &[("ram", 8), ("ram", 8)]);
    expect(s, "block \"ram\" appears twice in the block table");
}

#[test]
fn missing_block() {
    let mut s = vec![];
    table(&mut s, &[("ram", 8)]);
    expect(s, "destination block \"vram\" is not in the stream");
}

#[test]
fn page_size_mismatch() {
    let mut s = vec![];
    Header::new(1).write(&mut s).unwrap();
    TableEntry {
        used_length: 8 * PAGE,
        page_size: 2 << 20,
        flags: 0,
    }
    .write("ram", &mut s)
    .unwrap();
    expect(
        s,
        "block \"ram\": page size 0x200000 on the source, 0x1000 here",
    );
}

#[test]
fn size_mismatch_fixed_and_past_resizable_max() {
    let mut s = vec![];
    table(&mut s, &[("ram", 9)]);
    expect(
        s,
        "block \"ram\": 0x9000 bytes on the source, the destination has 0x8000",
    );
    let mut s = vec![];
    table(&mut s, &[("ram", 8), ("vram", 5)]);
    expect(
        s,
        "block \"vram\": 0x5000 bytes on the source, the destination has 0x4000",
    );
}

#[test]
fn read_only_destination() {
    let list = List::new();
    let spec = BlockSpec::new(BlockName::new("rom").unwrap(), ByteLen(PAGE))
        .flags(BlockFlags::READ_ONLY | BlockFlags::MIGRATABLE);
    let mem = Mem::new(
        vec![0; PAGE as usize].into_boxed_slice(),
        ByteLen(PAGE),
        PageSize::SIZE_4K,
    )
    .unwrap();
    list.add(spec.clone(), mem, BlockBitmaps::for_spec(&spec).unwrap())
        .unwrap();
    let mut s = vec![];
    table(&mut s, &[("rom", 1)]);
    assert_eq!(
        receive(&list, &s).unwrap_err().to_string(),
        "destination block \"rom\" is read-only"
    );
}

#[test]
fn unknown_record() {
    let mut s = vec![];
    good_table(&mut s);
    s.push(77);
    expect(s, "unknown record tag 77");
}

#[test]
fn bad_block_index() {
    let mut s = vec![];
    good_table(&mut s);
    pages(&mut s, 2, 0, 1, 1);
    expect(s, "record names block index 2, past the block table");
}

#[test]
fn bad_run_lengths() {
    for count in [0, MAX_RUN_PAGES + 1] {
        let mut s = vec![];
        good_table(&mut s);
        Record::Zero {
            block: 0,
            first: 0,
            count,
        }
        .write(&mut s)
        .unwrap();
        expect(s, &format!("record of {count} pages (1..=64 allowed)"));
    }
}

#[test]
fn length_overflow() {
    let mut s = vec![];
    good_table(&mut s);
    Record::Pages {
        block: 0,
        first: u64::MAX,
        count: 1,
    }
    .write(&mut s)
    .unwrap();
    expect(s, "record's first page plus count overflows");
}

#[test]
fn past_used_length() {
    let mut s = vec![];
    good_table(&mut s);
    pages(&mut s, 1, 1, 2, 1);
    expect(
        s,
        "record for pages 1..+2 of block \"vram\" runs past its 2 used pages",
    );
}

#[test]
fn resize_refused() {
    let mut s = vec![];
    good_table(&mut s);
    Record::Resize {
        block: 0,
        used_length: 4 * PAGE,
    }
    .write(&mut s)
    .unwrap();
    expect(s, "block \"ram\" cannot be resized to 0x4000");
}

#[test]
fn end_count_mismatch() {
    let mut s = vec![];
    good_table(&mut s);
    Record::End { count: 1 }.write(&mut s).unwrap();
    expect(s, "end record has 1 checksums for 2 blocks");
}

#[test]
fn checksum_mismatch() {
    let mut s = vec![];
    good_table(&mut s);
    Record::End { count: 2 }.write(&mut s).unwrap();
    s.extend_from_slice(&0u64.to_le_bytes());
    s.extend_from_slice(&0u64.to_le_bytes());
    let list = dest();
    let err = receive(&list, &s).unwrap_err();
    assert!(
        matches!(&err, ReceiveError::ChecksumMismatch { name, expected: 0, .. } if name.as_str() == "ram"),
        "{err}"
    );
}

#[test]
fn truncated_record_writes_nothing_of_it_and_keeps_accepted_pages() {
    let mut s = vec![];
    good_table(&mut s);
    pages(&mut s, 0, 0, 2, 0x11); // accepted
    pages(&mut s, 0, 4, 3, 0x22);
    s.truncate(s.len() - 100); // the second record is cut short
    let list = dest();
    assert_eq!(
        receive(&list, &s).unwrap_err().to_string(),
        "the stream ended in the middle of a record"
    );
    for (block, page, byte, uniform) in pages_of(&list) {
        assert!(uniform);
        let want = if block == "ram" && page < 2 {
            0x11
        } else {
            GUARD
        };
        assert_eq!(byte, want, "{block} page {page}");
    }
}

#[test]
fn every_prefix_of_a_good_stream_fails_cleanly_and_a_restart_succeeds() {
    let src_pages: Vec<u8> = (0..8).map(|p| p as u8 + 1).collect();
    let mut s = vec![];
    good_table(&mut s);
    for (p, &b) in src_pages.iter().enumerate() {
        pages(&mut s, 0, p as u64, 1, b);
    }
    Record::Zero {
        block: 1,
        first: 0,
        count: 2,
    }
    .write(&mut s)
    .unwrap();
    Record::Resize {
        block: 1,
        used_length: 3 * PAGE,
    }
    .write(&mut s)
    .unwrap();
    pages(&mut s, 1, 2, 1, 0x77);
    Record::Sync {
        pass: 0,
        remaining: 0,
    }
    .write(&mut s)
    .unwrap();
    Record::End { count: 2 }.write(&mut s).unwrap();
    // The end checksums by their definition: page digests summed.
    let sum = |pages: &[Vec<u8>]| {
        let digests = pages.iter().enumerate();
        let total = digests.fold(0u64, |a, (i, p)| a.wrapping_add(page_digest(i as u64, p)));
        finish_sum(total, pages.len() as u64 * PAGE)
    };
    let ram: Vec<Vec<u8>> = src_pages.iter().map(|&b| vec![b; PAGE as usize]).collect();
    let vram = vec![
        vec![0; PAGE as usize],
        vec![0; PAGE as usize],
        vec![0x77; PAGE as usize],
    ];
    s.extend_from_slice(&sum(&ram).to_le_bytes());
    s.extend_from_slice(&sum(&vram).to_le_bytes());

    let list = dest();
    for cut in (0..s.len()).step_by(997).chain([s.len() - 1]) {
        assert!(receive(&list, &s[..cut]).is_err(), "prefix {cut} accepted");
    }
    // The same receiver list takes the whole stream afterwards.
    let summary = receive(&list, &s).unwrap();
    assert_eq!(
        summary,
        ReceiveSummary {
            pages: 9,
            zero_pages: 2,
            passes: 1,
            blocks: 2,
            ..ReceiveSummary::default()
        }
    );
    let got = pages_of(&list);
    assert_eq!(got.len(), 11);
    assert!(got.iter().all(|p| p.3));
    assert_eq!(
        got.iter().map(|p| p.2).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0x77]
    );
}

/// A destination whose memory starts zero (fresh), unlike the guard-filled
/// one.
fn fresh_dest() -> List {
    let list = List::new();
    let spec = BlockSpec::new(BlockName::new("ram").unwrap(), ByteLen(8 * PAGE))
        .flags(BlockFlags::MIGRATABLE);
    add_buffer_block(&list, spec, 0);
    list
}

/// A stream to [`fresh_dest`]: pass 0 sends pages 0-3 as 0x11 and 4-7 as
/// zero, pass 1 sends pages 1-2 as zero again (the guest cleared them), and
/// the end record carries `sum` for the final contents.
fn fresh_stream(sum: u64) -> Vec<u8> {
    let mut s = vec![];
    table(&mut s, &[("ram", 8)]);
    pages(&mut s, 0, 0, 4, 0x11);
    let zero = |s: &mut Vec<u8>, first, count| {
        Record::Zero {
            block: 0,
            first,
            count,
        }
        .write(s)
        .unwrap()
    };
    zero(&mut s, 4, 4);
    zero(&mut s, 1, 2);
    Record::End { count: 1 }.write(&mut s).unwrap();
    s.extend_from_slice(&sum.to_le_bytes());
    s
}

/// [`fresh_stream`] with the end checksum of what it leaves: pages
/// `[0x11, 0, 0, 0x11, 0, 0, 0, 0]`.
fn verified_fresh_stream() -> Vec<u8> {
    let final_pages: Vec<Vec<u8>> = [0x11, 0, 0, 0x11, 0, 0, 0, 0]
        .iter()
        .map(|&b| vec![b; PAGE as usize])
        .collect();
    let digests = final_pages.iter().enumerate();
    let total = digests.fold(0u64, |a, (i, p)| a.wrapping_add(page_digest(i as u64, p)));
    fresh_stream(finish_sum(total, 8 * PAGE))
}

#[test]
fn a_ledger_verifies_what_was_received_and_a_fresh_destination_still_clears_written_pages() {
    let good = verified_fresh_stream();

    let run = |stream: &[u8]| {
        let list = fresh_dest();
        let mut bounce = vec![0u8; BOUNCE_BYTES];
        let mut ledger = Ledger::new();
        let result = Receiver::new(&mut bounce)
            .unwrap()
            .with_ledger(&mut ledger)
            .with_fresh_destination()
            .receive(&list, &mut SliceReader::new(stream), |_| {});
        let bytes: Vec<u8> = pages_of(&list).iter().map(|p| p.2).collect();
        let received = list
            .read()
            .by_name("ram")
            .unwrap()
            .received()
            .received_count();
        (result, bytes, received)
    };
    let (result, bytes, received) = run(&good);
    result.unwrap();
    // Pages 1-2 were written in pass 0, so their zero records cleared them
    // even though the destination started fresh.
    assert_eq!(bytes, [0x11, 0, 0, 0x11, 0, 0, 0, 0]);
    assert_eq!(received, 8, "every page is recorded as received");

    // One byte flipped in transit: the ledger, fed what arrived, disagrees.
    let mut bad = good.clone();
    let payload = bad.iter().position(|&b| b == 0x11).unwrap();
    bad[payload + 100] ^= 1;
    assert!(matches!(
        run(&bad).0,
        Err(ReceiveError::ChecksumMismatch { .. })
    ));
}

/// A `Discard` in a stream that never goes to post-copy would zero pages
/// the end checksum vouches for (the attack: a receive with a ledger ended
/// `Ok` with wrong memory). A receive that does not do post-copy now
/// refuses the discard itself, before touching memory.
#[test]
fn a_discard_outside_postcopy_is_out_of_place() {
    let good = verified_fresh_stream();
    // The same stream with page 3 discarded just before the end.
    let end_at = good.len() - 8 - Record::End { count: 1 }.wire_len();
    let mut discarding = good[..end_at].to_vec();
    Record::Discard {
        block: 0,
        first: 3,
        count: 1,
    }
    .write(&mut discarding)
    .unwrap();
    discarding.extend_from_slice(&good[end_at..]);

    let run = |stream: &[u8]| {
        let list = fresh_dest();
        let mut bounce = vec![0u8; BOUNCE_BYTES];
        let mut ledger = Ledger::new();
        let result = Receiver::new(&mut bounce)
            .unwrap()
            .with_ledger(&mut ledger)
            .receive(&list, &mut SliceReader::new(stream), |_| {});
        let bytes: Vec<u8> = pages_of(&list).iter().map(|p| p.2).collect();
        (result, bytes)
    };
    let (result, bytes) = run(&good);
    result.unwrap();
    assert_eq!(bytes, [0x11, 0, 0, 0x11, 0, 0, 0, 0]);
    let (result, bytes) = run(&discarding);
    // Said as post-copy unsupported: the source then knows this side never
    // started the guest, and resumes its own.
    assert_eq!(result.unwrap_err(), ReceiveError::PostcopyUnsupported);
    assert_eq!(
        bytes,
        [0x11, 0, 0, 0x11, 0, 0, 0, 0],
        "page 3 was not discarded"
    );
}

/// A reader that never offers its bytes in place, so every payload goes
/// through the receiver's bounce buffer (as over a transport that cannot
/// tell what it holds).
struct Staged<'a>(SliceReader<'a>);

impl ramblock_core::stream::io::ByteRead for Staged<'_> {
    type Error = Infallible;
    fn read_exact(
        &mut self,
        buf: &mut [u8],
    ) -> Result<(), ramblock_core::stream::io::ReadError<Infallible>> {
        self.0.read_exact(buf)
    }
}

#[test]
fn payloads_read_in_place_and_staged_leave_the_same_memory_at_every_cut() {
    let mut s = vec![];
    good_table(&mut s);
    pages(&mut s, 0, 1, 3, 0x31);
    pages(&mut s, 1, 0, 2, 0x32);
    pages(&mut s, 0, 6, 2, 0x33);
    pages(&mut s, 0, 2, 1, 0x34); // sent again, as a later pass does
    for cut in 0..=s.len() {
        let (in_place, staged) = (dest(), dest());
        let mut bounce = vec![0u8; BOUNCE_BYTES];
        let a = Receiver::new(&mut bounce).unwrap().receive(
            &in_place,
            &mut SliceReader::new(&s[..cut]),
            |_| {},
        );
        let b = Receiver::new(&mut bounce).unwrap().receive(
            &staged,
            &mut Staged(SliceReader::new(&s[..cut])),
            |_| {},
        );
        assert_eq!(a, b, "cut at {cut}");
        assert_eq!(pages_of(&in_place), pages_of(&staged), "cut at {cut}");
    }
    // The whole stream (no End record) wrote every page it carried.
    let list = dest();
    let _ = receive(&list, &s);
    let written: Vec<_> = pages_of(&list)
        .into_iter()
        .filter(|&(_, _, byte, _)| byte != GUARD)
        .collect();
    let want = [
        ("ram", 1, 0x31),
        ("ram", 2, 0x34),
        ("ram", 3, 0x31),
        ("ram", 6, 0x33),
        ("ram", 7, 0x33),
        ("vram", 0, 0x32),
        ("vram", 1, 0x32),
    ];
    assert_eq!(
        written,
        want.iter()
            .map(|&(b, p, byte)| (b.to_string(), p, byte, true))
            .collect::<Vec<_>>()
    );
}

/// Found by the `postcopy_resume` fuzz target: the ledger is indexed by
/// table position, and a second stream on the same receiver with the
/// table reordered verified against what the first stream recorded for
/// another block, so its end could vouch for contents the blocks do not
/// hold. A new stream now starts from an empty ledger.
#[test]
fn a_new_stream_cannot_verify_with_the_previous_streams_ledger() {
    use ramblock_core::checksum::Checksum;
    let list = List::new();
    for name in ["a", "b"] {
        add_buffer_block(
            &list,
            BlockSpec::new(BlockName::new(name).unwrap(), ByteLen(PAGE)),
            0,
        );
    }
    let sum_of = |byte: u8| {
        let page = vec![byte; PAGE as usize];
        let mut mem = page.clone();
        let m = ramblock_core::buffer::BufferMemory::new(
            &mut mem[..],
            ByteLen(PAGE),
            ramblock_core::addr::PageSize::SIZE_4K,
        )
        .unwrap();
        Checksum::of_region(&ramblock_core::host::HostMemory::region(&m), PAGE).unwrap()
    };
    let stream = |order: [&str; 2], pages: &[(u32, u8)], sums: [u8; 2]| {
        let mut s = vec![];
        Header::new(2).write(&mut s).unwrap();
        for name in order {
            TableEntry {
                used_length: PAGE,
                page_size: PAGE,
                flags: BlockFlags::MIGRATABLE.bits(),
            }
            .write(name, &mut s)
            .unwrap();
        }
        for &(block, byte) in pages {
            Record::Pages {
                block,
                first: 0,
                count: 1,
            }
            .write(&mut s)
            .unwrap();
            s.extend(std::iter::repeat_n(byte, PAGE as usize));
        }
        Record::End { count: 2 }.write(&mut s).unwrap();
        for byte in sums {
            s.extend_from_slice(&sum_of(byte).to_le_bytes());
        }
        s
    };
    let mut bounce = vec![0u8; BOUNCE_BYTES];
    let mut ledger = Ledger::new();
    let mut rx = Receiver::new(&mut bounce).unwrap().with_ledger(&mut ledger);
    // "a" gets 0x11, "b" 0x22: verified.
    let first = stream(["a", "b"], &[(0, 0x11), (1, 0x22)], [0x11, 0x22]);
    rx.receive(&list, &mut SliceReader::new(&first), |_| {})
        .unwrap();
    // The table reordered, nothing sent, an end claiming "b" holds 0x11
    // and "a" 0x22: what the old ledger held at those positions.
    let second = stream(["b", "a"], &[], [0x11, 0x22]);
    let result = rx.receive(&list, &mut SliceReader::new(&second), |_| {});
    assert!(
        matches!(result, Err(ReceiveError::ChecksumMismatch { .. })),
        "{result:?}"
    );
}
