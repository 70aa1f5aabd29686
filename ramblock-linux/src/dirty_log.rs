//! [`UffdWpLog`]: a [`DirtyLogSource`] that needs no hypervisor. Guest RAM
//! is registered on a userfaultfd in write-protect mode with
//! `UFFD_FEATURE_WP_ASYNC` and protected; a write to a protected page is
//! resolved by the kernel itself (it lifts the protection and lets the
//! write through, no message, no waiting thread), so "not protected" means
//! "written since the last harvest". A harvest asks the kernel which pages
//! are written and re-protects them in the same call (`PAGEMAP_SCAN` with
//! `PM_SCAN_WP_MATCHING`, see [`crate::pagemap_scan`]), so a write that
//! lands after a page was reported faults again and is seen by the next
//! harvest: nothing is lost, and nothing needs clearing before sending
//! ([`DirtyLogSource::needs_clear`] is false).
//!
//! It sees every write through this process's mapping of the memory: host
//! threads (a device model, an emulator's vCPU threads, the VMM itself) and
//! a KVM guest, whose writes fault through the same page tables. It does
//! not see writes that bypass them: another mapping of the same memfd or
//! file (another process, a vhost-user backend), `write(2)` into the fd,
//! and DMA into pages pinned before the protection (VFIO, `io_uring` fixed
//! buffers, `O_DIRECT` in flight). `docs/uffd-wp-dirty-log.md` has the
//! details.
//!
//! Granularity is the host page: a write into a hugetlb page reports every
//! target page of it. Transparent hugepages are split on the first write
//! after protection, so anonymous memory is tracked per 4 KiB page.
//!
//! ```no_run
//! use ramblock_core::addr::{ByteLen, RamAddr};
//! use ramblock_core::bitmap::MigrationBitmap;
//! use ramblock_core::dirty_log::{BlockInfo, DirtyLogSource};
//! use ramblock_core::host::HostMemory;
//! use ramblock_linux::dirty_log::UffdWpLog;
//! use ramblock_linux::MemoryBuilder;
//!
//! let mem = MemoryBuilder::anonymous(ByteLen(2 << 20)).build()?;
//! let mut log = UffdWpLog::new()?;
//! log.track(RamAddr(0), &mem)?;
//! mem.region().write(ByteLen(5 << 12), b"written behind everyone's back")?;
//! let info = BlockInfo {
//!     name: "ram",
//!     offset: RamAddr(0),
//!     used_length: mem.used_len(),
//!     page_size: mem.page_size(),
//!     flags: mem.flags(),
//! };
//! let mut words = vec![0u64; 8];
//! let mut dirty = MigrationBitmap::new(&mut words[..], 512).unwrap();
//! assert_eq!(log.harvest(&info, &mut dirty)?, 1);
//! assert!(dirty.is_set(5).unwrap());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::memory::LinuxMemory;
use crate::pagemap_scan::{PageRegion, Pagemap, ScanError};
use crate::uffd::{Features, RegisterMode, UffdError, Userfaultfd};
use ramblock_core::addr::{PageSize, RamAddr};
use ramblock_core::bitmap::{BitRangeError, MigrationBitmap};
use ramblock_core::dirty_log::{BlockInfo, DirtyLogSource};
use ramblock_core::host::HostMemory;

/// Target page size of the core's bitmaps.
const TARGET_PAGE: u64 = 4096;

/// Regions the output vector holds by default (24 bytes each): a harvest
/// of scattered pages needs one scan per this many runs.
pub const DEFAULT_SCAN_CAPACITY: usize = 4096;

/// What the uffd-wp log needs from the kernel's userfaultfd.
const NEEDED: Features = Features::PAGEFAULT_FLAG_WP
    .union(Features::WP_ASYNC)
    .union(Features::WP_UNPOPULATED);

/// Why the uffd-wp log failed.
#[derive(Debug, thiserror::Error)]
pub enum WpLogError {
    /// The kernel's userfaultfd lacks a feature the log needs.
    #[error(
        "the kernel's userfaultfd lacks {missing} (it offers {offered}): asynchronous \
         write-protect (UFFD_FEATURE_WP_ASYNC) arrived in Linux 6.7 and needs \
         CONFIG_PTE_MARKER_UFFD_WP; use a newer kernel, or a KVM dirty-log mode"
    )]
    KernelLacks {
        /// The missing features.
        missing: Features,
        /// What the kernel offers.
        offered: Features,
    },
    /// userfaultfd itself failed (not permitted, a registration refused).
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// `PAGEMAP_SCAN` failed (or the kernel has none).
    #[error(transparent)]
    Scan(#[from] ScanError),
    /// A harvest of a block this log does not track.
    #[error("block {name:?} at RAM address {offset:#x} is not tracked by this uffd-wp log: track its memory first")]
    NotTracked {
        /// The block's name.
        name: String,
        /// Its RAM address.
        offset: u64,
    },
    /// A block that grew past what was tracked: its tail's writes would
    /// be missed.
    #[error("block {name:?} is {used:#x} bytes now but only {tracked:#x} are tracked: track it again after growing it")]
    Grown {
        /// The block's name.
        name: String,
        /// Its used length now.
        used: u64,
        /// What is tracked.
        tracked: u64,
    },
    /// A block tracked twice, at overlapping addresses or one RAM address.
    #[error(
        "RAM address {offset:#x} (host {base:#x}+{len:#x}) is tracked already: untrack it first"
    )]
    AlreadyTracked {
        /// The RAM address.
        offset: u64,
        /// The memory's host address.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// The kernel reported a page outside the range, or no progress.
    #[error("PAGEMAP_SCAN reported {what} for {start:#x}..{end:#x}: a kernel this code does not understand")]
    BadScan {
        /// What was wrong.
        what: &'static str,
        /// The range scanned.
        start: u64,
        /// Its end.
        end: u64,
    },
    /// A reported run did not fit the caller's bitmap.
    #[error("the harvest of {name:?} did not fit its migration bitmap: {source}")]
    Bitmap {
        /// The block.
        name: String,
        /// The bitmap's complaint.
        source: BitRangeError,
    },
}

/// One tracked block's memory.
#[derive(Copy, Clone, Debug)]
struct Tracked {
    offset: RamAddr,
    base: u64,
    len: u64,
    page_size: PageSize,
}

/// A dirty log over userfaultfd asynchronous write-protect; see the module
/// docs. One descriptor serves every tracked block.
#[derive(Debug)]
pub struct UffdWpLog {
    uffd: Userfaultfd,
    pagemap: Pagemap,
    blocks: Vec<Tracked>,
    regions: Vec<PageRegion>,
}

impl UffdWpLog {
    /// Opens a userfaultfd with asynchronous write-protect and
    /// `/proc/self/pagemap`, checking the kernel offers both:
    /// [`WpLogError::KernelLacks`] names a missing userfaultfd feature,
    /// [`ScanError::Unsupported`] a missing `PAGEMAP_SCAN`.
    pub fn new() -> Result<UffdWpLog, WpLogError> {
        let uffd = match Userfaultfd::with_features(NEEDED) {
            Ok(uffd) => uffd,
            Err(UffdError::FeatureMissing {
                missing, offered, ..
            }) => return Err(WpLogError::KernelLacks { missing, offered }),
            Err(e) => return Err(e.into()),
        };
        let pagemap = Pagemap::open()?;
        Ok(UffdWpLog {
            uffd,
            pagemap,
            blocks: Vec::new(),
            regions: vec![PageRegion::default(); DEFAULT_SCAN_CAPACITY],
        })
    }

    /// Sets how many ranges one scan returns (at least 1): a smaller
    /// vector means more scans per harvest, never a lost page.
    pub fn set_scan_capacity(&mut self, regions: usize) {
        self.regions = vec![PageRegion::default(); regions.max(1)];
    }

    /// The userfaultfd the log registers memory on.
    pub fn userfaultfd(&self) -> &Userfaultfd {
        &self.uffd
    }

    /// Starts tracking the used part of `mem`, the memory of the block at
    /// RAM address `offset`: registers it for write-protect and protects
    /// all of it, so the next harvest reports only what is written from
    /// now on (a migration marks everything dirty to begin with anyway).
    ///
    /// Anonymous, memfd and hugetlb memory work (shared and hugetlb memory
    /// need [`Features::WP_HUGETLBFS_SHMEM`]); a read-only mapping is
    /// [`UffdError::ModeUnsupported`].
    ///
    /// The log remembers the memory's address. Untrack it
    /// ([`UffdWpLog::untrack`]) before the memory is unmapped: a harvest
    /// after that is refused by the kernel (the range is no longer
    /// registered), unless something mapped there since was registered for
    /// asynchronous write-protect too, whose written state it would then
    /// consume (protection only: no memory contents change).
    pub fn track(&mut self, offset: RamAddr, mem: &LinuxMemory) -> Result<(), WpLogError> {
        let base = mem.base().as_ptr() as u64;
        let len = mem.used_len().0;
        if let Some(t) = self
            .blocks
            .iter()
            .find(|t| t.offset == offset || (t.base < base + len && base < t.base + t.len))
        {
            return Err(WpLogError::AlreadyTracked {
                offset: t.offset.0,
                base: t.base,
                len: t.len,
            });
        }
        let block = self
            .uffd
            .register_memory(mem, RegisterMode::WRITE_PROTECT)?;
        // With WP_UNPOPULATED (and always on shmem and hugetlb) this also
        // leaves a marker in every empty entry, so a first touch after it
        // is tracked too.
        self.uffd
            .write_protect(block.base(), block.len(), true, false)?;
        self.blocks.push(Tracked {
            offset,
            base,
            len: block.len() as u64,
            page_size: mem.page_size(),
        });
        Ok(())
    }

    /// Stops tracking the block at `offset` and unregisters its memory
    /// (nothing if it is not tracked).
    pub fn untrack(&mut self, offset: RamAddr) -> Result<(), WpLogError> {
        let Some(at) = self.blocks.iter().position(|t| t.offset == offset) else {
            return Ok(());
        };
        let t = self.blocks.remove(at);
        self.uffd.unregister(t.base as *mut u8, t.len as usize)?;
        Ok(())
    }

    /// The blocks tracked, as (RAM address, host page size).
    pub fn tracked(&self) -> impl Iterator<Item = (RamAddr, PageSize)> + '_ {
        self.blocks.iter().map(|t| (t.offset, t.page_size))
    }

    /// Harvests `start .. end` (host addresses, whole pages), calling
    /// `run(first, count)` in target pages from `start` for each written
    /// run, re-protecting what it reports.
    fn scan(
        &mut self,
        start: u64,
        end: u64,
        run: &mut dyn FnMut(usize, usize) -> Result<(), WpLogError>,
    ) -> Result<(), WpLogError> {
        let mut at = start;
        while at < end {
            let scanned = self
                .pagemap
                .scan_written(at, end, true, &mut self.regions)?;
            for r in &self.regions[..scanned.regions] {
                if r.start < at || r.end > end || r.start >= r.end || r.start % TARGET_PAGE != 0 {
                    return Err(WpLogError::BadScan {
                        what: "a region outside the range",
                        start: at,
                        end,
                    });
                }
                let first = (r.start - start) / TARGET_PAGE;
                let count = (r.end - r.start).div_ceil(TARGET_PAGE);
                run(first as usize, count as usize)?;
            }
            // The walk stops early only when the vector filled; then it
            // resumes where it stopped (pages from there on were neither
            // reported nor re-protected). No progress would loop forever.
            if scanned.walk_end <= at {
                return Err(WpLogError::BadScan {
                    what: "a walk that made no progress",
                    start: at,
                    end,
                });
            }
            at = scanned.walk_end;
        }
        Ok(())
    }

    /// The tracked range of `block`, up to its used length.
    fn range_of(&self, block: &BlockInfo<'_>) -> Result<(u64, u64), WpLogError> {
        let t = self
            .blocks
            .iter()
            .find(|t| t.offset == block.offset)
            .ok_or_else(|| WpLogError::NotTracked {
                name: block.name.into(),
                offset: block.offset.0,
            })?;
        let used = block.used_length.0;
        if used > t.len {
            return Err(WpLogError::Grown {
                name: block.name.into(),
                used,
                tracked: t.len,
            });
        }
        Ok((t.base, t.base + used))
    }

    /// Harvests `block` into a caller's bitmap of its target pages (bit 0
    /// = its first page) through `mark(first, count)`, for callers without
    /// a [`MigrationBitmap`] (a snapshot's page set, a model in a test).
    pub fn harvest_with(
        &mut self,
        block: &BlockInfo<'_>,
        mut mark: impl FnMut(usize, usize),
    ) -> Result<(), WpLogError> {
        let (start, end) = self.range_of(block)?;
        self.scan(start, end, &mut |first, count| {
            mark(first, count);
            Ok(())
        })
    }
}

impl DirtyLogSource for UffdWpLog {
    type Error = WpLogError;

    /// Never: a harvest re-protects what it reports in the same call.
    fn needs_clear(&self) -> bool {
        false
    }

    fn harvest(
        &mut self,
        block: &BlockInfo<'_>,
        into: &mut MigrationBitmap<&mut [u64]>,
    ) -> Result<u64, WpLogError> {
        let (start, end) = self.range_of(block)?;
        let mut newly = 0;
        self.scan(start, end, &mut |first, count| {
            newly += into
                .set_range(first, count)
                .map_err(|source| WpLogError::Bitmap {
                    name: block.name.into(),
                    source,
                })?;
            Ok(())
        })?;
        Ok(newly)
    }

    fn clear(&mut self, _: &BlockInfo<'_>, _: usize, _: usize) -> Result<(), WpLogError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel without the features gets an error that names them and
    /// the kernel version that has them.
    #[test]
    fn a_kernel_without_async_write_protect_is_told_what_is_missing() {
        let err = WpLogError::KernelLacks {
            missing: Features::WP_ASYNC | Features::WP_UNPOPULATED,
            offered: Features::PAGEFAULT_FLAG_WP | Features::MISSING_SHMEM,
        };
        let text = err.to_string();
        for needed in [
            "WP_ASYNC",
            "WP_UNPOPULATED",
            "Linux 6.7",
            "PAGEFAULT_FLAG_WP",
        ] {
            assert!(text.contains(needed), "{text}");
        }
        let err = WpLogError::from(ScanError::Unsupported {
            errno: rustix::io::Errno::NOTTY,
        });
        let text = err.to_string();
        assert!(
            text.contains("PAGEMAP_SCAN") && text.contains("Linux 6.7"),
            "{text}"
        );
    }

    #[test]
    fn harvesting_an_untracked_or_grown_block_is_refused() {
        let Ok(mut log) = UffdWpLog::new() else {
            println!("skipped: no uffd-wp log on this host");
            return;
        };
        let mem = crate::MemoryBuilder::memfd(ramblock_core::addr::ByteLen(1 << 20))
            .build()
            .unwrap();
        let mut info = BlockInfo {
            name: "ram",
            offset: RamAddr(0),
            used_length: mem.used_len(),
            page_size: mem.page_size(),
            flags: mem.flags(),
        };
        let mut words = [0u64; 8];
        let mut into = MigrationBitmap::new(&mut words[..], 512).unwrap();
        assert!(matches!(
            log.harvest(&info, &mut into),
            Err(WpLogError::NotTracked { .. })
        ));
        log.track(RamAddr(0), &mem).unwrap();
        assert_eq!(log.harvest(&info, &mut into).unwrap(), 0);
        info.used_length = ramblock_core::addr::ByteLen(2 << 20);
        let err = log.harvest(&info, &mut into).unwrap_err();
        assert!(matches!(err, WpLogError::Grown { .. }), "{err}");
        assert_eq!(log.tracked().count(), 1);
        log.untrack(RamAddr(0)).unwrap();
        assert_eq!(log.tracked().count(), 0);
    }
}
