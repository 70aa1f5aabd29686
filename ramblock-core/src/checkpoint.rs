//! [`CheckpointCache`]: the staging copy of one block on a COLO secondary.
//!
//! In COLO (coarse-grained lock-stepping) the secondary VM runs on its own
//! RAM while the primary sends it checkpoints. A checkpoint's pages must not
//! reach that RAM until the whole checkpoint has arrived: one cut off half
//! way would leave the RAM neither the old state nor the new one. So each
//! page goes to a cache (host memory as long as the block's used length) and
//! is marked; once the checkpoint is complete, [`CheckpointCache::commit`]
//! copies the marked pages into the RAM and clears the marks, and a failed
//! checkpoint is [`CheckpointCache::abort`]ed, which drops the marks (the
//! cache contents no longer matter).
//!
//! QEMU also restores, at each commit, the pages the secondary's own guest
//! wrote since the last checkpoint, from a cache that starts as a copy of the
//! RAM. [`CheckpointCache::mark_range`] serves that: mark those pages and the
//! commit copies them back. Seeding the cache is the caller's business (it
//! owns the memory before handing it over).
//!
//! # Why [`CheckpointCache::commit`] takes a [`HostRegion`], not a block
//! A secondary's RAM is not being migrated, so a commit is not a device
//! write: it must not mark migration-dirty bits (as [`RamBlock::write`]
//! does), and it needs nothing else from the block. A region is all the copy
//! needs; pass [`RamBlock::region`]. It also serves RAM that is in no
//! [`RamList`](crate::list::RamList).
//!
//! # Storage
//! The marks are one bit per 4 KiB page over caller words (`&mut [u64]`,
//! [`mark_words_needed`] of them), so no allocator is needed;
//! with the `alloc` feature, `CheckpointCache::allocate` owns them.
//!
//! [`RamBlock::write`]: crate::block::RamBlock::write
//! [`RamBlock::region`]: crate::block::RamBlock::region

use crate::addr::{ByteLen, TARGET_PAGE_SIZE};
use crate::bitmap::{words_for, MigrationBitmap, StorageTooSmall};
use crate::host::HostMemory;
use crate::region::HostRegion;
use core::fmt;

/// Bytes copied per step of a commit: one page, through a stack buffer.
const PAGE: usize = TARGET_PAGE_SIZE as usize;

/// A bad request to a [`CheckpointCache`]; nothing was changed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum CheckpointError {
    /// The used length is not a whole number of 4 KiB pages.
    Unaligned {
        /// The used length asked for.
        used_length: u64,
    },
    /// The cache memory has fewer accessible bytes than the used length.
    CacheTooShort {
        /// Accessible bytes of the cache memory.
        cache_len: u64,
        /// The used length the cache must cover.
        needed: u64,
    },
    /// The caller's mark words are too few.
    Storage(StorageTooSmall),
    /// Pages outside the cache.
    PageOutOfRange {
        /// First page asked for.
        page: u64,
        /// Pages asked for.
        count: u64,
        /// Pages the cache covers.
        pages: u64,
    },
    /// Page data that is not exactly one 4 KiB page.
    WrongDataLength {
        /// Bytes given.
        len: u64,
    },
    /// The RAM to commit into is shorter than the cache.
    RamTooShort {
        /// Bytes of the RAM region.
        ram_len: u64,
        /// Bytes the cache covers.
        needed: u64,
    },
}

impl fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CheckpointError::Unaligned { used_length } => write!(
                f,
                "used length {used_length:#x} is not a multiple of the 4 KiB target page; \
                 pass the block's used length"
            ),
            CheckpointError::CacheTooShort { cache_len, needed } => write!(
                f,
                "cache memory has {cache_len:#x} accessible bytes, the block needs {needed:#x}; \
                 give the cache the block's used length"
            ),
            CheckpointError::Storage(e) => write!(f, "checkpoint marks: {e}"),
            CheckpointError::PageOutOfRange { page, count, pages } => write!(
                f,
                "pages {page}..+{count} are outside the cache of {pages} pages"
            ),
            CheckpointError::WrongDataLength { len } => write!(
                f,
                "a checkpoint page is {TARGET_PAGE_SIZE} bytes, {len} were given"
            ),
            CheckpointError::RamTooShort { ram_len, needed } => write!(
                f,
                "the RAM region is {ram_len:#x} bytes, the cache covers {needed:#x}; \
                 commit into the block the cache was made for"
            ),
        }
    }
}

impl core::error::Error for CheckpointError {}

/// A refused [`CheckpointCache::new`]: the error, and the memory and words
/// handed back untouched.
pub struct CacheRejected<M, W> {
    /// What was wrong.
    pub error: CheckpointError,
    /// The cache memory.
    pub cache: M,
    /// The mark words.
    pub marks: W,
}

impl<M, W> fmt::Debug for CacheRejected<M, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheRejected({:?})", self.error)
    }
}

impl<M, W> fmt::Display for CacheRejected<M, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl<M, W> core::error::Error for CacheRejected<M, W> {}

/// What a [`CheckpointCache::commit`] copied.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Pages copied into the RAM.
    pub pages: u64,
    /// Runs of consecutive marked pages, each copied front to back in one go.
    pub runs: u64,
}

/// One block's checkpoint cache; see the module docs.
pub struct CheckpointCache<M, W> {
    cache: M,
    /// One bit per page. The crate's single-owner plain bitmap, which keeps a
    /// count of set bits, is exactly what marks need; here "dirty" means
    /// "marked".
    marks: MigrationBitmap<W>,
}

impl<M, W> fmt::Debug for CheckpointCache<M, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The bitmap's Debug shows its length and count of set (marked) bits.
        f.debug_struct("CheckpointCache")
            .field("marks", &self.marks)
            .finish_non_exhaustive()
    }
}

/// Mark words a [`CheckpointCache`] of `used_length` bytes needs.
pub fn mark_words_needed(used_length: ByteLen) -> usize {
    words_for(usize::try_from(used_length.target_pages().0).unwrap_or(usize::MAX))
}

impl<M: HostMemory, W: AsRef<[u64]> + AsMut<[u64]>> CheckpointCache<M, W> {
    /// A cache of `used_length` bytes (the block's used length) over `cache`,
    /// with marks over `marks`; nothing marked. The cache memory must have at
    /// least `used_length` bytes accessible.
    pub fn new(cache: M, marks: W, used_length: ByteLen) -> Result<Self, CacheRejected<M, W>> {
        let refuse = |error, cache, marks| {
            Err(CacheRejected {
                error,
                cache,
                marks,
            })
        };
        if used_length.0 % TARGET_PAGE_SIZE != 0 {
            let error = CheckpointError::Unaligned {
                used_length: used_length.0,
            };
            return refuse(error, cache, marks);
        }
        let cache_len = cache.used_len();
        // A length that does not fit the address space cannot be backed.
        let pages = usize::try_from(used_length.target_pages().0);
        let (Ok(pages), true) = (pages, cache_len >= used_length) else {
            let error = CheckpointError::CacheTooShort {
                cache_len: cache_len.0,
                needed: used_length.0,
            };
            return refuse(error, cache, marks);
        };
        let needed = words_for(pages);
        let given = marks.as_ref().len();
        if given < needed {
            let error = CheckpointError::Storage(StorageTooSmall { needed, given });
            return refuse(error, cache, marks);
        }
        let marks = MigrationBitmap::new(marks, pages)
            .unwrap_or_else(|e| unreachable!("sizes checked above: {e}"));
        Ok(CheckpointCache { cache, marks })
    }

    /// Pages the cache covers.
    pub fn pages(&self) -> u64 {
        self.marks.len() as u64
    }

    /// Pages marked for the next commit.
    pub fn marked_count(&self) -> u64 {
        self.marks.dirty_count()
    }

    /// The cache memory.
    pub fn cache(&self) -> &M {
        &self.cache
    }

    /// `count` pages from `page` as indexes, if they lie inside the cache.
    fn range(&self, page: u64, count: u64) -> Result<(usize, usize), CheckpointError> {
        let pages = self.marks.len();
        let err = CheckpointError::PageOutOfRange {
            page,
            count,
            pages: pages as u64,
        };
        let start = usize::try_from(page).map_err(|_| err)?;
        let count = usize::try_from(count).map_err(|_| err)?;
        match start.checked_add(count) {
            Some(end) if end <= pages => Ok((start, count)),
            _ => Err(err),
        }
    }

    /// Whether `page` is marked.
    pub fn is_marked(&self, page: u64) -> Result<bool, CheckpointError> {
        let (page, _) = self.range(page, 1)?;
        Ok(self
            .marks
            .is_set(page)
            .unwrap_or_else(|e| unreachable!("range checked: {e}")))
    }

    /// Writes one checkpoint page (exactly 4 KiB) into the cache and marks
    /// it. A bad page or length writes nothing.
    pub fn write_page(&mut self, page: u64, data: &[u8]) -> Result<(), CheckpointError> {
        if data.len() != PAGE {
            return Err(CheckpointError::WrongDataLength {
                len: data.len() as u64,
            });
        }
        let (index, _) = self.range(page, 1)?;
        if let Err(e) = self.cache.region().write(ByteLen::from_pages(page), data) {
            unreachable!("the cache covers every page in range: {e}");
        }
        let _ = self.marks.set_range(index, 1);
        Ok(())
    }

    /// Marks `count` pages from `page` without writing them, so the next
    /// commit restores them from the cache (pages the secondary's guest
    /// wrote since the last checkpoint). Returns how many were newly marked.
    pub fn mark_range(&mut self, page: u64, count: u64) -> Result<u64, CheckpointError> {
        let (start, count) = self.range(page, count)?;
        Ok(self
            .marks
            .set_range(start, count)
            .unwrap_or_else(|e| unreachable!("range checked: {e}")))
    }

    /// Copies every marked page from the cache into `ram` (the block's
    /// region, see the module docs), consecutive marked pages as one run,
    /// then clears the marks. A `ram` shorter than the cache is refused
    /// before anything is copied, and the marks are kept.
    pub fn commit(&mut self, ram: HostRegion<'_>) -> Result<CommitStats, CheckpointError> {
        let pages = self.marks.len();
        let needed = pages as u64 * TARGET_PAGE_SIZE;
        if (ram.len() as u64) < needed {
            return Err(CheckpointError::RamTooShort {
                ram_len: ram.len() as u64,
                needed,
            });
        }
        let cache = self.cache.region();
        let mut stats = CommitStats::default();
        let mut bounce = [0u8; PAGE];
        let mut next = 0;
        while let Some(start) = self.marks.find_next_dirty(next) {
            let end = self.marks.find_next_clean(start).unwrap_or(pages);
            // HostRegion copies only to and from Rust buffers (it is the one
            // raw access to guest RAM), so the run goes page by page through
            // the stack; both regions cover every page below `pages`.
            for page in start..end {
                let at = ByteLen::from_pages(page as u64);
                if let Err(e) = cache.read(at, &mut bounce) {
                    unreachable!("checked at construction: {e}");
                }
                if let Err(e) = ram.write(at, &bounce) {
                    unreachable!("checked above: {e}");
                }
            }
            stats.pages += (end - start) as u64;
            stats.runs += 1;
            next = end;
        }
        let _ = self.marks.clear_range(0, pages);
        Ok(stats)
    }

    /// Drops every mark (a checkpoint that failed part way); the RAM is not
    /// touched. Returns how many pages were marked.
    pub fn abort(&mut self) -> u64 {
        let pages = self.marks.len();
        self.marks.clear_range(0, pages).unwrap_or(0)
    }
}

#[cfg(feature = "alloc")]
impl<M: HostMemory> CheckpointCache<M, alloc::boxed::Box<[u64]>> {
    /// A cache of `used_length` bytes over `cache`, with heap-allocated marks.
    pub fn allocate(
        cache: M,
        used_length: ByteLen,
    ) -> Result<Self, CacheRejected<M, alloc::boxed::Box<[u64]>>> {
        let words = crate::bitmap::alloc_plain(mark_words_needed(used_length));
        Self::new(cache, words, used_length)
    }
}
