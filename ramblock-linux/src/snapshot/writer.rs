//! [`save`]: writes a snapshot file from guest memory.
//!
//! The file is created at its full length (a sparse file: every page a
//! hole), then worker threads take 4 MiB chunks of the blocks in turn;
//! each finds the runs of non-zero pages to save in its chunk, writes each
//! run from guest memory with one `pwritev(2)` (the kernel copies from the
//! guest's pages; nothing is copied in user space) and hashes the pages
//! while they are in cache. Zero pages are left as holes. The metadata is
//! written last, so a file cut short by a crash fails its checksum.

use super::error::SnapshotError;
use super::io::{random_id, write_region_at};
use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::checksum::{finish_sum, page_digest_region};
use ramblock_core::name::BlockName;
use ramblock_core::region::HostRegion;
use ramblock_core::section::{SectionHeader, SectionName};
use ramblock_core::snapshot::layout::{bitmap_len, DataCursor, MetaCursor};
use ramblock_core::snapshot::{
    seal, section_checksum, BlockEntry, FormatError, Header, Kind, SectionEntry, BLOCK_ENTRY_LEN,
    HEADER_LEN, MAX_BLOCKS, MAX_META_LEN, MAX_SECTIONS, SECTION_ENTRY_LEN,
};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;
/// Pages per unit of work: 4 MiB, large enough that a thread's runs are
/// long writes, small enough that threads finish together.
const CHUNK_PAGES: u64 = 1024;
/// The longest run written at once: 256 KiB, so the pages just hashed are
/// still in the CPU's cache when the kernel copies them.
const RUN_PAGES: u64 = 64;

/// One block to save.
#[derive(Debug)]
pub struct SaveBlock<'a> {
    /// The block's name.
    pub name: BlockName,
    /// Its used memory (whole pages of `page_size`).
    pub region: HostRegion<'a>,
    /// Its host page size.
    pub page_size: PageSize,
    /// Which pages to save, one bit per 4 KiB page (bit `i % 64` of word
    /// `i / 64`); `None` saves every page (a full snapshot must).
    pub pages: Option<&'a [u64]>,
    /// One digest per page: the writer stores the digest of each page it
    /// saves here, and the block's content checksum is taken over all of
    /// them. For a diff, the caller keeps the table from the snapshots
    /// before (see [`super::Snapshotter`]).
    pub digests: &'a [AtomicU64],
}

/// One state section to save.
#[derive(Debug)]
pub struct SaveSection<'a> {
    /// Whose state.
    pub name: SectionName,
    /// Which instance.
    pub instance_id: u32,
    /// The state's own version.
    pub version: u32,
    /// The state.
    pub bytes: &'a [u8],
}

/// How to write.
#[derive(Copy, Clone, Debug)]
pub struct SaveOptions {
    /// Worker threads (at least one).
    pub threads: usize,
    /// Write page data with `O_DIRECT`, bypassing the page cache.
    pub direct: bool,
    /// `fdatasync` before returning.
    pub sync: bool,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            threads: std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .min(8),
            direct: false,
            sync: false,
        }
    }
}

/// What a save did.
#[derive(Clone, Debug)]
pub struct SaveSummary {
    /// The new file's path.
    pub path: PathBuf,
    /// Its id.
    pub file_id: [u8; 16],
    /// Its metadata checksum (what a diff saved after it names).
    pub meta_checksum: u64,
    /// Page bytes written (zero pages are holes and not counted).
    pub bytes_written: u64,
    /// Pages the file holds.
    pub pages_held: u64,
    /// Held pages that were zero (holes).
    pub zero_pages: u64,
    /// The file's length (its apparent size; holes take no space).
    pub file_len: u64,
    /// Per block, its content checksum.
    pub content_checksums: Vec<u64>,
    /// How long it took.
    pub elapsed: Duration,
}

/// Per-chunk results, summed per block.
#[derive(Default)]
pub(crate) struct Totals {
    data_sum: AtomicU64,
    held: AtomicU64,
    zero: AtomicU64,
    written: AtomicU64,
}

fn selected(pages: Option<&[u64]>, page: u64) -> bool {
    pages.is_none_or(|w| {
        w.get((page / 64) as usize)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    })
}

/// A block as the layout sees it: what a save checks and plans.
pub(crate) struct Shape<'a> {
    pub name: &'a BlockName,
    pub len: u64,
    pub page_size: PageSize,
}

/// Checks that `blocks` and `sections` can be saved in one file (counts,
/// whole pages, sizes, unique names) and places them.
pub(crate) fn plan_for(
    blocks: &[Shape<'_>],
    sections: &[SaveSection<'_>],
) -> Result<Plan, SnapshotError> {
    let layout = SnapshotError::Layout;
    if blocks.len() > MAX_BLOCKS as usize {
        return Err(layout(FormatError::TooManyBlocks {
            count: blocks.len() as u32,
        }));
    }
    if sections.len() > MAX_SECTIONS as usize {
        return Err(layout(FormatError::TooManySections {
            count: sections.len() as u32,
        }));
    }
    for (i, b) in blocks.iter().enumerate() {
        let bad = |why| {
            Err(SnapshotError::BadBlock {
                name: b.name.to_string(),
                why,
            })
        };
        if b.len == 0 || b.len % b.page_size.bytes() != 0 || b.len % PAGE != 0 {
            return bad("its length is not a non-zero number of whole pages");
        }
        if b.len > ramblock_core::snapshot::MAX_BLOCK_LEN {
            return bad("it is larger than a snapshot block may be (1 TiB)");
        }
        if blocks[..i].iter().any(|o| o.name == b.name) {
            return bad("another block has the same name");
        }
    }
    for (i, s) in sections.iter().enumerate() {
        if sections[..i]
            .iter()
            .any(|o| o.name == s.name && o.instance_id == s.instance_id)
        {
            return Err(layout(FormatError::DuplicateSection { index: i as u32 }));
        }
        if s.bytes.len() as u64 > ramblock_core::section::MAX_SECTION_LEN {
            return Err(layout(FormatError::Section {
                index: i as u32,
                error: ramblock_core::section::SectionError::TooLong {
                    len: s.bytes.len() as u64,
                },
            }));
        }
    }
    Plan::for_sections(
        &blocks
            .iter()
            .map(|b| (ByteLen(b.len), b.page_size))
            .collect::<Vec<_>>(),
        sections,
    )
}

/// The file being written: created at its full length (every page a
/// hole), with a second `O_DIRECT` handle for page data when asked.
#[derive(Debug)]
pub(crate) struct Output<'p> {
    pub path: &'p Path,
    file: File,
    direct: Option<File>,
    file_id: [u8; 16],
}

impl<'p> Output<'p> {
    /// Creates the file at `path` for `plan`.
    pub fn create(path: &'p Path, plan: &Plan, direct: bool) -> Result<Output<'p>, SnapshotError> {
        let file_id = random_id().map_err(|e| {
            SnapshotError::io("getrandom", path, e, "the kernel must offer randomness")
        })?;
        let file = create_sized(
            path,
            plan.data_end,
            "the snapshot's directory must be writable",
        )?;
        let direct = if direct {
            Some(
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)
                    .map_err(|e| {
                        SnapshotError::io(
                            "open(O_DIRECT)",
                            path,
                            e,
                            "the filesystem must support O_DIRECT (tmpfs may not); save without it",
                        )
                    })?,
            )
        } else {
            None
        };
        Ok(Output {
            path,
            file,
            direct,
            file_id,
        })
    }

    /// Saves pages `first ..` of one block, whose memory `region` holds
    /// (from page `first` on, whole 4 KiB pages) and whose data starts at
    /// `data_at` in the file: each page `pages` selects is hashed into
    /// `digests` and, unless zero (a hole), written, in runs of non-zero
    /// pages straight from `region`. The paused and the live save both
    /// write pages through here.
    pub fn save_pages(
        &self,
        region: &HostRegion<'_>,
        first: u64,
        data_at: u64,
        pages: Option<&[u64]>,
        digests: &[AtomicU64],
        totals: &Totals,
    ) -> Result<(), SnapshotError> {
        let data_file = self.direct.as_ref().unwrap_or(&self.file);
        let end = first + region.len() as u64 / PAGE;
        let at = |page: u64| ByteLen((page - first) * PAGE);
        let (mut sum, mut held, mut zero, mut written) = (0u64, 0u64, 0u64, 0u64);
        let mut run: Option<u64> = None;
        let flush = |run_start: u64, run_end: u64| -> Result<u64, SnapshotError> {
            let len = (run_end - run_start) * PAGE;
            let sub = region.subregion(at(run_start), len as usize)?;
            write_region_at(data_file, &sub, data_at + run_start * PAGE).map_err(|e| {
                SnapshotError::io(
                    "pwritev",
                    self.path,
                    e,
                    "the snapshot's filesystem must have space",
                )
            })?;
            Ok(len)
        };
        for page in first..end {
            let keep = selected(pages, page) && !region.is_zero(at(page), PAGE as usize)?;
            if selected(pages, page) {
                held += 1;
                let d = page_digest_region(page, region, at(page))?;
                digests[page as usize].store(d, Ordering::Relaxed);
                sum = sum.wrapping_add(d);
                if !keep {
                    zero += 1;
                }
            }
            match (keep, run) {
                (true, None) => run = Some(page),
                (false, Some(s)) => {
                    written += flush(s, page)?;
                    run = None;
                }
                _ => {}
            }
            // Written while the hashing left it in cache.
            if let Some(s) = run.filter(|&s| page + 1 - s >= RUN_PAGES) {
                written += flush(s, page + 1)?;
                run = None;
            }
        }
        if let Some(s) = run {
            written += flush(s, end)?;
        }
        totals.data_sum.fetch_add(sum, Ordering::Relaxed);
        totals.held.fetch_add(held, Ordering::Relaxed);
        totals.zero.fetch_add(zero, Ordering::Relaxed);
        totals.written.fetch_add(written, Ordering::Relaxed);
        Ok(())
    }

    /// Writes the metadata once every page is saved (last, so a file cut
    /// short fails its checksum) and syncs if asked: `blocks` with their
    /// page bitmaps (`None`: every page), digest tables and totals.
    #[allow(clippy::too_many_arguments)]
    pub fn finish(
        self,
        plan: &Plan,
        kind: Kind,
        blocks: &[Shape<'_>],
        bitmaps: &[Option<&[u64]>],
        digests: &[&[AtomicU64]],
        totals: &[Totals],
        sections: &[SaveSection<'_>],
        sync: bool,
        start: Instant,
    ) -> Result<SaveSummary, SnapshotError> {
        let path = self.path;
        let mut entries = Vec::with_capacity(blocks.len());
        let mut content_checksums = Vec::with_capacity(blocks.len());
        for (i, b) in blocks.iter().enumerate() {
            let pages = b.len / PAGE;
            let all = digests[i][..pages as usize]
                .iter()
                .fold(0u64, |a, d| a.wrapping_add(d.load(Ordering::Relaxed)));
            let content = finish_sum(all, pages * PAGE);
            content_checksums.push(content);
            let t = &totals[i];
            let held = t.held.load(Ordering::Relaxed);
            entries.push(BlockEntry {
                name: b.name.clone(),
                used_length: ByteLen(pages * PAGE),
                page_size: b.page_size,
                bitmap_offset: plan.bitmap_at[i],
                data_offset: plan.data_at[i],
                held_pages: held,
                content_checksum: content,
                data_checksum: finish_sum(t.data_sum.load(Ordering::Relaxed), held * PAGE),
            });
        }
        let (meta, meta_checksum) = plan.encode(kind, self.file_id, &entries, sections, |b, w| {
            bitmaps[b].map_or(u64::MAX, |p| p[w])
        });
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(&meta, 0).map_err(|e| {
            SnapshotError::io(
                "pwrite",
                path,
                e,
                "the snapshot's filesystem must have space",
            )
        })?;
        if sync {
            self.file.sync_data().map_err(|e| {
                SnapshotError::io(
                    "fdatasync",
                    path,
                    e,
                    "the snapshot's filesystem failed to write back",
                )
            })?;
        }
        let sum = |f: fn(&Totals) -> &AtomicU64| {
            totals
                .iter()
                .map(|t| f(t).load(Ordering::Relaxed))
                .sum::<u64>()
        };
        Ok(SaveSummary {
            path: path.to_owned(),
            file_id: self.file_id,
            meta_checksum,
            bytes_written: sum(|t| &t.written),
            pages_held: sum(|t| &t.held),
            zero_pages: sum(|t| &t.zero),
            file_len: plan.data_end,
            content_checksums,
            elapsed: start.elapsed(),
        })
    }
}

/// Saves `blocks` and `sections` to a new file at `path` (replacing one
/// there) as a full snapshot or, with `kind` [`Kind::Diff`], a diff of the
/// pages each block selects. `progress` is called from the workers with the
/// bytes of memory done so far.
pub fn save(
    path: &Path,
    blocks: &[SaveBlock<'_>],
    sections: &[SaveSection<'_>],
    kind: Kind,
    options: SaveOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<SaveSummary, SnapshotError> {
    let start = Instant::now();
    let shapes: Vec<Shape<'_>> = blocks
        .iter()
        .map(|b| Shape {
            name: &b.name,
            len: b.region.len() as u64,
            page_size: b.page_size,
        })
        .collect();
    let plan = plan_for(&shapes, sections)?;
    for b in blocks {
        let bad = |why| {
            Err(SnapshotError::BadBlock {
                name: b.name.to_string(),
                why,
            })
        };
        let pages = b.region.len() as u64 / PAGE;
        if (b.digests.len() as u64) < pages {
            return bad("its digest table has fewer entries than it has pages");
        }
        if b.pages
            .is_some_and(|w| (w.len() as u64) < pages.div_ceil(64))
        {
            return bad("its page bitmap is shorter than the block");
        }
    }
    if matches!(kind, Kind::Full) && blocks.iter().any(|b| b.pages.is_some()) {
        return Err(SnapshotError::BadBlock {
            name: String::new(),
            why: "a full snapshot saves every page; give no page bitmap",
        });
    }
    let out = Output::create(path, &plan, options.direct)?;

    // Pages.
    let totals: Vec<Totals> = blocks.iter().map(|_| Totals::default()).collect();
    let chunks: Vec<(usize, u64)> = blocks
        .iter()
        .enumerate()
        .flat_map(|(i, b)| {
            let pages = b.region.len() as u64 / PAGE;
            (0..pages.div_ceil(CHUNK_PAGES)).map(move |c| (i, c * CHUNK_PAGES))
        })
        .collect();
    let next = AtomicUsize::new(0);
    let done_bytes = AtomicU64::new(0);
    let threads = options.threads.max(1).min(chunks.len().max(1));
    let worker = || -> Result<(), SnapshotError> {
        loop {
            let Some(&(bi, first)) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) else {
                return Ok(());
            };
            let b = &blocks[bi];
            let end = (first + CHUNK_PAGES).min(b.region.len() as u64 / PAGE);
            let region = b
                .region
                .subregion(ByteLen(first * PAGE), ((end - first) * PAGE) as usize)?;
            out.save_pages(
                &region,
                first,
                plan.data_at[bi],
                b.pages,
                b.digests,
                &totals[bi],
            )?;
            let d = done_bytes.fetch_add((end - first) * PAGE, Ordering::Relaxed);
            progress(d + (end - first) * PAGE);
        }
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(worker)).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(SnapshotError::WorkerPanicked)))
            .collect::<Result<Vec<()>, _>>()
    })?;

    // Metadata.
    let bitmaps: Vec<Option<&[u64]>> = blocks.iter().map(|b| b.pages).collect();
    let digests: Vec<&[AtomicU64]> = blocks.iter().map(|b| b.digests).collect();
    out.finish(
        &plan,
        kind,
        &shapes,
        &bitmaps,
        &digests,
        &totals,
        sections,
        options.sync,
        start,
    )
}

/// Where everything of a file goes (see [`ramblock_core::snapshot::layout`]).
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub bitmap_at: Vec<u64>,
    pub section_at: Vec<u64>,
    pub meta_len: u64,
    pub data_at: Vec<u64>,
    pub data_end: u64,
}

impl Plan {
    /// Places blocks of these used lengths and page sizes and `sections`
    /// (by the length of their bytes): what a save and a merge both write.
    pub(crate) fn for_sections(
        blocks: &[(ByteLen, PageSize)],
        sections: &[SaveSection<'_>],
    ) -> Result<Plan, SnapshotError> {
        let lens = sections
            .iter()
            .map(|s| s.bytes.len() as u64)
            .collect::<Vec<_>>();
        Plan::new(blocks, &lens)
    }

    /// Places blocks of these used lengths and page sizes and sections of
    /// these lengths.
    pub fn new(blocks: &[(ByteLen, PageSize)], sections: &[u64]) -> Result<Plan, SnapshotError> {
        let layout = SnapshotError::Layout;
        let mut meta_cursor = MetaCursor::new(blocks.len() as u32, sections.len() as u32);
        let bitmap_at = blocks
            .iter()
            .map(|&(used, _)| meta_cursor.bitmap(used))
            .collect::<Result<Vec<_>, _>>()
            .map_err(layout)?;
        let section_at = sections
            .iter()
            .map(|&len| meta_cursor.section(len))
            .collect::<Result<Vec<_>, _>>()
            .map_err(layout)?;
        let meta_len = meta_cursor.meta_len().map_err(layout)?;
        if meta_len > MAX_META_LEN {
            return Err(layout(FormatError::MetaLen {
                found: meta_len,
                expected: MAX_META_LEN,
            }));
        }
        let mut data_cursor = DataCursor::new(meta_len);
        let data_at = blocks
            .iter()
            .map(|&(used, page)| data_cursor.data(used, page))
            .collect::<Result<Vec<_>, _>>()
            .map_err(layout)?;
        Ok(Plan {
            bitmap_at,
            section_at,
            meta_len,
            data_at,
            data_end: data_cursor.end(),
        })
    }

    /// The sealed metadata for `entries` (placed by this plan), whose
    /// bitmaps' words `word(block, w)` gives (bits past a block's end are
    /// cleared here), and `sections`; with its checksum.
    pub fn encode(
        &self,
        kind: Kind,
        file_id: [u8; 16],
        entries: &[BlockEntry],
        sections: &[SaveSection<'_>],
        word: impl Fn(usize, usize) -> u64,
    ) -> (Vec<u8>, u64) {
        let mut meta = vec![0u8; self.meta_len as usize];
        for (i, entry) in entries.iter().enumerate() {
            let mut e = [0u8; BLOCK_ENTRY_LEN];
            entry.encode(&mut e);
            let at = HEADER_LEN + i * BLOCK_ENTRY_LEN;
            meta[at..at + BLOCK_ENTRY_LEN].copy_from_slice(&e);
            let pages = entry.pages();
            let start = self.bitmap_at[i] as usize;
            let bm = &mut meta[start..start + bitmap_len(entry.used_length) as usize];
            for (w, out) in bm.chunks_exact_mut(8).enumerate() {
                let first = w as u64 * 64;
                let valid = pages.saturating_sub(first).min(64);
                let mask = if valid == 64 {
                    u64::MAX
                } else {
                    (1u64 << valid) - 1
                };
                out.copy_from_slice(&(word(i, w) & mask).to_le_bytes());
            }
        }
        for (i, s) in sections.iter().enumerate() {
            let entry = SectionEntry {
                header: SectionHeader {
                    name: s.name.clone(),
                    instance_id: s.instance_id,
                    version: s.version,
                    len: s.bytes.len() as u64,
                },
                offset: self.section_at[i],
                checksum: section_checksum(s.bytes),
            };
            let mut e = [0u8; SECTION_ENTRY_LEN];
            entry.encode(&mut e);
            let at = HEADER_LEN + entries.len() * BLOCK_ENTRY_LEN + i * SECTION_ENTRY_LEN;
            meta[at..at + SECTION_ENTRY_LEN].copy_from_slice(&e);
            let at = self.section_at[i] as usize;
            meta[at..at + s.bytes.len()].copy_from_slice(s.bytes);
        }
        let header = Header {
            kind,
            file_id,
            block_count: entries.len() as u32,
            section_count: sections.len() as u32,
            meta_len: self.meta_len,
            data_end: self.data_end,
            meta_checksum: 0,
        };
        let mut h = [0u8; HEADER_LEN];
        header.encode(&mut h);
        meta[..HEADER_LEN].copy_from_slice(&h);
        let sum = seal(&mut meta);
        (meta, sum)
    }
}

/// [`create_file`] at `len` bytes (a sparse file: all holes).
pub(crate) fn create_sized(
    path: &Path,
    len: u64,
    hint: &'static str,
) -> Result<File, SnapshotError> {
    let file = create_file(path, hint)?;
    file.set_len(len).map_err(|e| {
        SnapshotError::io(
            "ftruncate",
            path,
            e,
            "the filesystem must hold a file this large",
        )
    })?;
    Ok(file)
}

/// Creates (or truncates) the output file at `path`, readable and writable
/// by its owner only (a snapshot holds guest memory); `hint` says what the
/// caller needs when that fails.
pub(crate) fn create_file(path: &Path, hint: &'static str) -> Result<File, SnapshotError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| SnapshotError::io("open", path, e, hint))
}
