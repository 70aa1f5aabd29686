//! Dirty bitmaps across a local update (`ramblock_linux::local_update::
//! {send_dirty, receive_dirty}`): random dirty sets for several clients,
//! some marked by the VMM and some harvested from a dirty-log source, sent
//! and merged into fresh blocks, read back page by page against a model;
//! every malformed message is its own typed error and merges nothing.

use ramblock_core::addr::ByteLen;
use ramblock_core::bitmap::{MigrationBitmap, Owned};
use ramblock_core::block::{BlockBitmaps, BlockSpec, RamBlock};
use ramblock_core::dirty_log::{BlockInfo, DirtyClient, DirtyClients, DirtyLogSource};
use ramblock_core::list::RamList;
use ramblock_core::name::BlockName;
use ramblock_linux::local_update::{
    receive_dirty, send_dirty, DirtyBitmapError, LocalUpdateError, FRAME_LEN, MAGIC, VERSION,
};
use ramblock_linux::{LinuxMemory, MemoryBuilder};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

const PAGE: u64 = 4096;
type Ram = RamList<'static, LinuxMemory, Owned, 4>;
type Block = RamBlock<LinuxMemory, Owned>;
/// (block name, client) -> dirty pages.
type Model = HashMap<(String, DirtyClient), BTreeSet<usize>>;

/// Blocks whose used pages are not multiples of 64, inside larger max
/// lengths, so the last word is partial and bits past it exist.
const BLOCKS: [(&str, u64, u64); 3] = [
    ("pc.ram", 1021, 2048),
    ("vga.vram", 130, 130),
    ("rom", 7, 64),
];

/// SplitMix64, so a failure reproduces from its seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn ram(blocks: &[(&str, u64, u64)]) -> &'static Ram {
    let ram: &'static Ram = Box::leak(Box::new(RamList::new()));
    for (name, used, max) in blocks {
        let mem = MemoryBuilder::anonymous(ByteLen(used * PAGE))
            .max_length(ByteLen(max * PAGE))
            .build()
            .unwrap();
        let mut spec =
            BlockSpec::new(BlockName::new(name).unwrap(), ByteLen(used * PAGE)).flags(mem.flags());
        if max > used {
            spec = spec.resizable(ByteLen(max * PAGE));
        }
        let bitmaps = BlockBitmaps::<Owned>::for_spec(&spec).unwrap();
        ram.add(spec, mem, bitmaps).map_err(|r| r.error).unwrap();
    }
    ram
}

fn blocks(ram: &'static Ram) -> Vec<&'static Block> {
    let view = Box::leak(Box::new(ram.read()));
    view.iter().collect()
}

fn pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (a, b)
}

/// A hypervisor log that reports a fixed set of pages per block once.
struct FakeLog(BTreeMap<String, BTreeSet<usize>>);

impl DirtyLogSource for FakeLog {
    type Error = Infallible;
    fn needs_clear(&self) -> bool {
        false
    }
    fn harvest(
        &mut self,
        block: &BlockInfo<'_>,
        into: &mut MigrationBitmap<&mut [u64]>,
    ) -> Result<u64, Infallible> {
        let mut newly = 0;
        for &p in self.0.remove(block.name).unwrap_or_default().iter() {
            newly += into.set_range(p, 1).unwrap();
        }
        Ok(newly)
    }
    fn clear(&mut self, _: &BlockInfo<'_>, _: usize, _: usize) -> Result<(), Infallible> {
        Ok(())
    }
}

/// Marks random pages dirty per client through the block API, and for the
/// migration client also through a harvest; returns the model.
fn dirty_randomly(blocks: &[&Block], rng: &mut Rng) -> Model {
    let mut model = Model::new();
    let mut log = FakeLog(BTreeMap::new());
    for block in blocks {
        let pages = block.used_pages();
        for client in DirtyClient::ALL {
            let set = model.entry((block.name().to_owned(), client)).or_default();
            // Sometimes empty, sometimes every page, usually a few runs.
            match rng.below(6) {
                0 => {}
                1 => set.extend(0..pages),
                _ => {
                    for _ in 0..rng.below(40) {
                        let first = rng.below(pages as u64) as usize;
                        let len = 1 + rng.below(70) as usize;
                        set.extend(first..(first + len).min(pages));
                    }
                }
            }
            let one = DirtyClients::from_bits_truncate(1 << client as u8);
            for &p in set.iter() {
                block
                    .mark_dirty(ByteLen(p as u64 * PAGE), ByteLen(1), one)
                    .unwrap();
            }
        }
        let harvested: BTreeSet<usize> = (0..rng.below(50))
            .map(|_| rng.below(pages as u64) as usize)
            .collect();
        model
            .entry((block.name().to_owned(), DirtyClient::Migration))
            .or_default()
            .extend(harvested.iter().copied());
        log.0.insert(block.name().to_owned(), harvested);
    }
    // The source's last harvest, vCPUs paused.
    for block in blocks {
        block.sync_dirty_log(&mut log).unwrap();
    }
    model
}

/// The destination's dirty pages of `client` in `block`, read page by
/// page, including the pages past the used length (which must be clean).
fn read_back(block: &Block, client: DirtyClient) -> BTreeSet<usize> {
    let bitmap = block.dirty(client);
    (0..bitmap.len())
        .filter(|&p| bitmap.is_set(p).unwrap())
        .collect()
}

#[test]
fn random_dirty_sets_arrive_exactly() {
    for seed in 0..16u64 {
        let mut rng = Rng(seed);
        let source = blocks(ram(&BLOCKS));
        let model = dirty_randomly(&source, &mut rng);
        let dest = blocks(ram(&BLOCKS));
        let (tx, rx) = pair();
        // The code client does not keep logging here: it must not travel.
        let clients = DirtyClients::DISPLAY | DirtyClients::MIGRATION;
        send_dirty(&tx, source.iter().copied(), clients).unwrap();
        let merged = receive_dirty(&rx, &dest).unwrap();
        assert_eq!(merged.entries, 2 * BLOCKS.len() as u32, "seed {seed}");
        let mut total = 0;
        for block in &dest {
            for client in DirtyClient::ALL {
                let got = read_back(block, client);
                let want = if clients.has(client) {
                    model[&(block.name().to_owned(), client)].clone()
                } else {
                    BTreeSet::new()
                };
                total += want.len() as u64;
                assert_eq!(got, want, "seed {seed} block {} {client:?}", block.name());
            }
        }
        assert_eq!(merged.newly_dirty, total, "seed {seed}");
    }
}

#[test]
fn bits_are_ored_into_what_the_destination_has() {
    let source = blocks(ram(&BLOCKS[..1]));
    source[0]
        .mark_dirty(ByteLen(5 * PAGE), ByteLen(1), DirtyClients::MIGRATION)
        .unwrap();
    let dest = blocks(ram(&BLOCKS[..1]));
    dest[0]
        .mark_dirty(ByteLen(9 * PAGE), ByteLen(1), DirtyClients::MIGRATION)
        .unwrap();
    let (tx, rx) = pair();
    send_dirty(&tx, source.iter().copied(), DirtyClients::MIGRATION).unwrap();
    let merged = receive_dirty(&rx, &dest).unwrap();
    assert_eq!(merged.newly_dirty, 1);
    assert_eq!(
        read_back(dest[0], DirtyClient::Migration),
        BTreeSet::from([5, 9])
    );
}

fn raw(sock: &mut UnixStream, kind: u8, count: u32, body: &[u8]) {
    let mut f = [0u8; FRAME_LEN];
    f[..8].copy_from_slice(&MAGIC);
    f[8] = kind;
    f[10..12].copy_from_slice(&VERSION.to_le_bytes());
    f[12..16].copy_from_slice(&count.to_le_bytes());
    f[16..24].copy_from_slice(&(body.len() as u64).to_le_bytes());
    sock.write_all(&f).unwrap();
    sock.write_all(body).unwrap();
}

fn entry(name: &str, client: u8, words: &[u64]) -> Vec<u8> {
    entry_claiming(name, client, words.len() as u32, words)
}

fn entry_claiming(name: &str, client: u8, count: u32, words: &[u64]) -> Vec<u8> {
    let mut e = vec![name.len() as u8];
    e.extend_from_slice(name.as_bytes());
    e.push(client);
    e.extend_from_slice(&count.to_le_bytes());
    for w in words {
        e.extend_from_slice(&w.to_le_bytes());
    }
    e
}

/// Sends `count` entries `body` to fresh blocks; returns the error and
/// checks that nothing was merged.
fn reject(count: u32, body: &[u8]) -> LocalUpdateError {
    let dest = blocks(ram(&BLOCKS));
    let (mut tx, rx) = pair();
    raw(&mut tx, 6, count, body);
    let err = receive_dirty(&rx, &dest).unwrap_err();
    for block in &dest {
        for client in DirtyClient::ALL {
            assert!(read_back(block, client).is_empty(), "{err}: merged anyway");
        }
    }
    err
}

fn bad_entry(err: LocalUpdateError) -> (u32, DirtyBitmapError) {
    match err {
        LocalUpdateError::BadDirty { index, error } => (index, error),
        other => panic!("expected BadDirty, got {other:?}"),
    }
}

#[test]
fn malformed_messages_are_typed_errors_and_merge_nothing() {
    // A valid first entry, so "merges nothing" shows checks come first.
    let good = entry("rom", 2, &[0b101]);
    let with = |second: Vec<u8>| [good.clone(), second].concat();

    let (i, e) = bad_entry(reject(2, &with(entry("nvram", 2, &[1]))));
    assert_eq!((i, e), (1, DirtyBitmapError::UnknownBlock("nvram".into())));

    let (i, e) = bad_entry(reject(2, &with(entry("vga.vram", 7, &[0, 0, 0]))));
    assert_eq!((i, e), (1, DirtyBitmapError::UnknownClient(7)));

    // vga.vram has 130 pages: 3 words, not 2.
    let (_, e) = bad_entry(reject(2, &with(entry("vga.vram", 0, &[1, 1]))));
    assert_eq!(
        e,
        DirtyBitmapError::WordCount {
            block: "vga.vram".into(),
            pages: 130,
            expected: 3,
            got: 2
        }
    );

    // Page 130 is the first past the end (bit 2 of word 2).
    let (_, e) = bad_entry(reject(2, &with(entry("vga.vram", 0, &[0, 0, 0b110]))));
    assert_eq!(
        e,
        DirtyBitmapError::BitsPastEnd {
            block: "vga.vram".into(),
            page: 130,
            pages: 130
        }
    );

    let (_, e) = bad_entry(reject(2, &with(entry("rom", 2, &[1]))));
    assert_eq!(
        e,
        DirtyBitmapError::Repeated {
            block: "rom".into(),
            client: DirtyClient::Migration
        }
    );

    let (_, e) = bad_entry(reject(2, &with(entry("", 0, &[]))));
    assert_eq!(e, DirtyBitmapError::BadName);

    // Claims 3 words, carries 1: the body ends first.
    let cut = entry_claiming("vga.vram", 0, 3, &[1]);
    let (_, e) = bad_entry(reject(2, &with(cut)));
    assert!(matches!(e, DirtyBitmapError::Truncated { .. }), "{e:?}");

    // More entries claimed than the body holds.
    let (i, e) = bad_entry(reject(2, &good));
    assert_eq!(i, 1);
    assert_eq!(e, DirtyBitmapError::Truncated { len: 0 });

    // Bytes after the last entry.
    let err = reject(1, &with(vec![0; 3]));
    assert!(
        matches!(err, LocalUpdateError::TrailingBytes { extra: 3, .. }),
        "{err:?}"
    );

    // A body longer than any valid message for these blocks is refused
    // before it is allocated or read.
    let (mut tx, rx) = pair();
    let dest = blocks(ram(&BLOCKS));
    let mut f = [0u8; FRAME_LEN];
    f[..8].copy_from_slice(&MAGIC);
    f[8] = 6;
    f[10..12].copy_from_slice(&VERSION.to_le_bytes());
    f[12..16].copy_from_slice(&1u32.to_le_bytes());
    f[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    tx.write_all(&f).unwrap();
    let err = receive_dirty(&rx, &dest).unwrap_err();
    assert!(
        matches!(err, LocalUpdateError::TooLong { len: u64::MAX, .. }),
        "{err:?}"
    );

    // Too many entries.
    let err = reject(u32::MAX, &[]);
    assert!(matches!(err, LocalUpdateError::TooLong { .. }), "{err:?}");

    // Another message type, and garbage.
    let (mut tx, rx) = pair();
    raw(&mut tx, 3, 0, &[]);
    let err = receive_dirty(&rx, &dest).unwrap_err();
    assert!(
        matches!(err, LocalUpdateError::UnexpectedMessage { got: 3, .. }),
        "{err:?}"
    );
    let (mut tx, rx) = pair();
    tx.write_all(&[0xa5; FRAME_LEN]).unwrap();
    let err = receive_dirty(&rx, &dest).unwrap_err();
    assert!(matches!(err, LocalUpdateError::BadMagic(_)), "{err:?}");
}

#[test]
fn a_block_of_another_length_is_refused() {
    // The source's vga.vram grew to 200 pages; the destination's has 130.
    let source = blocks(ram(&[("vga.vram", 200, 200)]));
    source[0]
        .mark_dirty(ByteLen(0), ByteLen(PAGE), DirtyClients::DISPLAY)
        .unwrap();
    let dest = blocks(ram(&BLOCKS));
    let (tx, rx) = pair();
    send_dirty(&tx, source.iter().copied(), DirtyClients::DISPLAY).unwrap();
    let (i, e) = bad_entry(receive_dirty(&rx, &dest).unwrap_err());
    assert_eq!(i, 0);
    assert_eq!(
        e,
        DirtyBitmapError::WordCount {
            block: "vga.vram".into(),
            pages: 130,
            expected: 3,
            got: 4
        }
    );
    assert!(read_back(dest[1], DirtyClient::Display).is_empty());
}
