//! Shared test helpers: the kernel's view of a mapping (`/proc/self/smaps`),
//! the hugepage pool guard, and the conformance suite every backing runs.
#![allow(dead_code)]

use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::host::HostMemory;
use std::path::{Path, PathBuf};

/// One VMA as `/proc/self/smaps` reports it.
#[derive(Clone, Debug, Default)]
pub struct Vma {
    pub start: usize,
    pub end: usize,
    pub perms: String,
    pub path: String,
    pub size_kb: u64,
    pub kernel_page_kb: u64,
    pub rss_kb: u64,
    pub hugetlb_kb: u64,
    pub locked_kb: u64,
    pub vm_flags: Vec<String>,
}

impl Vma {
    /// Resident bytes, counting hugetlb pages (which smaps keeps out of Rss).
    pub fn resident(&self) -> u64 {
        (self.rss_kb + self.hugetlb_kb) << 10
    }

    pub fn has_flag(&self, flag: &str) -> bool {
        self.vm_flags.iter().any(|f| f == flag)
    }
}

/// Every VMA of this process.
pub fn smaps() -> Vec<Vma> {
    let text = std::fs::read_to_string("/proc/self/smaps").expect("read /proc/self/smaps");
    let mut vmas: Vec<Vma> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) =
                (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            {
                let perms = words.next().unwrap_or("").to_owned();
                let path = words.skip(3).collect::<Vec<_>>().join(" ");
                vmas.push(Vma {
                    start,
                    end,
                    perms,
                    path,
                    ..Vma::default()
                });
                continue;
            }
        }
        let Some(vma) = vmas.last_mut() else { continue };
        let kb = || {
            words
                .clone()
                .next()
                .and_then(|w| w.parse::<u64>().ok())
                .unwrap_or(0)
        };
        match first {
            "Size:" => vma.size_kb = kb(),
            "KernelPageSize:" => vma.kernel_page_kb = kb(),
            "Rss:" => vma.rss_kb = kb(),
            "Shared_Hugetlb:" | "Private_Hugetlb:" => vma.hugetlb_kb += kb(),
            "Locked:" => vma.locked_kb = kb(),
            "VmFlags:" => vma.vm_flags = words.map(str::to_owned).collect(),
            _ => {}
        }
    }
    vmas
}

/// The VMA containing `addr`.
pub fn vma_at(addr: usize) -> Vma {
    smaps()
        .into_iter()
        .find(|v| v.start <= addr && addr < v.end)
        .unwrap_or_else(|| panic!("no mapping contains {addr:#x}"))
}

/// The run of adjacent VMAs around `addr` that the kernel keeps apart but
/// that look the same (same permissions, file and page size), merged into
/// one: hugetlb VMAs, for one, are never merged after an `mprotect`.
pub fn span_at(addr: usize) -> Vma {
    let vmas = smaps();
    let i = vmas
        .iter()
        .position(|v| v.start <= addr && addr < v.end)
        .unwrap_or_else(|| panic!("no mapping contains {addr:#x}"));
    let same = |a: &Vma, b: &Vma| {
        a.perms == b.perms && a.path == b.path && a.kernel_page_kb == b.kernel_page_kb
    };
    let mut first = i;
    while first > 0 && vmas[first - 1].end == vmas[first].start && same(&vmas[first - 1], &vmas[i])
    {
        first -= 1;
    }
    let mut last = i;
    while last + 1 < vmas.len()
        && vmas[last].end == vmas[last + 1].start
        && same(&vmas[last + 1], &vmas[i])
    {
        last += 1;
    }
    let mut span = vmas[i].clone();
    span.start = vmas[first].start;
    span.end = vmas[last].end;
    span.size_kb = vmas[first..=last].iter().map(|v| v.size_kb).sum();
    span.rss_kb = vmas[first..=last].iter().map(|v| v.rss_kb).sum();
    span.hugetlb_kb = vmas[first..=last].iter().map(|v| v.hugetlb_kb).sum();
    span.locked_kb = vmas[first..=last].iter().map(|v| v.locked_kb).sum();
    span
}

/// What the kernel should show for a backing.
#[derive(Copy, Clone, Debug)]
pub struct Expect {
    /// `s` rather than `p` in the permissions.
    pub shared: bool,
    /// `w` in the permissions.
    pub writable: bool,
    /// Shrinking gives the tail's memory back (anonymous, memfd).
    pub tail_released: bool,
}

/// The conformance suite: every `HostMemory` implementation must pass it.
/// It writes and reads through the region, resizes (if the memory has room
/// to grow), discards, and checks each step against `/proc/self/smaps`.
pub fn check_host_memory<M: HostMemory>(mem: &mut M, expect: Expect)
where
    M::Error: std::fmt::Debug,
{
    let page = mem.page_size();
    let ps = page.bytes() as usize;
    let base = mem.base().as_ptr() as usize;
    let used = mem.used_len().0 as usize;
    let reserved = mem.reserved_len().0 as usize;
    assert_eq!(base % ps, 0, "base {base:#x} is not aligned to {page}");
    assert!(used <= reserved && used > 0);

    // The kernel's view of the used part.
    check_used_vma(base, used, page, expect);
    if reserved > used {
        let tail = span_at(base + used);
        assert!(
            tail.perms.starts_with("---"),
            "tail {tail:?} must be inaccessible"
        );
        assert!(
            tail.end >= base + reserved,
            "tail {tail:?} must cover the reservation"
        );
    }

    // Write a distinct pattern into every page and read it back.
    if expect.writable {
        fill_pages(mem, 0, used);
        verify_pages(mem, 0, used);
        let vma = span_at(base);
        assert!(
            vma.resident() >= used as u64,
            "every written page must be resident: {vma:?}"
        );
    }

    // Grow in place, use the new part, shrink back.
    if reserved > used && expect.writable {
        mem.set_used_len(ByteLen(reserved as u64)).unwrap();
        assert_eq!(
            mem.base().as_ptr() as usize,
            base,
            "growing moved the block"
        );
        check_used_vma(base, reserved, page, expect);
        fill_pages(mem, used, reserved);
        verify_pages(mem, 0, reserved);
        mem.set_used_len(ByteLen(used as u64)).unwrap();
        assert_eq!(
            mem.base().as_ptr() as usize,
            base,
            "shrinking moved the block"
        );
        check_used_vma(base, used, page, expect);
        let tail = span_at(base + used);
        assert!(
            tail.perms.starts_with("---"),
            "shrunk tail {tail:?} must be inaccessible again"
        );
        if expect.tail_released {
            assert_eq!(
                tail.resident(),
                0,
                "shrunk tail {tail:?} must give its memory back"
            );
        }
        verify_pages(mem, 0, used);
    }
    assert!(mem
        .set_used_len(ByteLen(reserved as u64 + page.bytes()))
        .is_err());

    // Discard: the pages read back as zero and leave the resident set.
    if expect.writable {
        let (off, len) = if used >= 3 * ps {
            (ps, 2 * ps)
        } else {
            (0, ps)
        };
        let before = span_at(base).resident();
        mem.discard(ByteLen(off as u64), ByteLen(len as u64))
            .unwrap();
        let after = span_at(base).resident();
        assert!(
            after + len as u64 <= before,
            "discarding {len:#x} bytes must drop them from the resident set ({before:#x} -> {after:#x})"
        );
        let region = mem.region();
        assert!(
            region.is_zero(ByteLen::from_usize(off), len).unwrap(),
            "discarded pages must read as zero"
        );
        verify_pages(mem, 0, off);
        verify_pages(mem, off + len, used);
        if page.bytes() > 4096 {
            assert!(
                mem.discard(ByteLen(4096), ByteLen(4096)).is_err(),
                "a partial hugepage must not be discarded"
            );
        }
        assert!(mem
            .discard(ByteLen(0), ByteLen(used as u64 + page.bytes()))
            .is_err());
        fill_pages(mem, off, off + len);
        verify_pages(mem, 0, used);
    }
}

/// Checks the kernel shows `base .. base + used` as one accessible area of
/// the right kind and page size.
fn check_used_vma(base: usize, used: usize, page: PageSize, expect: Expect) {
    let vma = span_at(base);
    assert_eq!(
        vma.start, base,
        "the accessible part must start at base: {vma:?}"
    );
    assert_eq!(
        vma.end,
        base + used,
        "the accessible part must end at used_len: {vma:?}"
    );
    assert_eq!(
        vma.kernel_page_kb << 10,
        page.bytes(),
        "KernelPageSize: {vma:?}"
    );
    assert_eq!(&vma.perms[0..1], "r", "{vma:?}");
    assert_eq!(
        &vma.perms[1..2],
        if expect.writable { "w" } else { "-" },
        "{vma:?}"
    );
    assert_eq!(
        &vma.perms[3..4],
        if expect.shared { "s" } else { "p" },
        "{vma:?}"
    );
    if page.bytes() > 4096 {
        assert!(
            vma.has_flag("ht"),
            "hugetlb memory must carry the ht flag: {vma:?}"
        );
    }
}

fn pattern(page_index: usize) -> [u8; 8] {
    ((page_index as u64) ^ 0xa5a5_0000_0000_0001).to_le_bytes()
}

/// Writes a per-page pattern at the start and end of every page in `from .. to`.
fn fill_pages<M: HostMemory>(mem: &M, from: usize, to: usize) {
    let ps = mem.page_size().bytes() as usize;
    let region = mem.region();
    for off in (from..to).step_by(ps) {
        let p = pattern(off / ps);
        region.write(ByteLen::from_usize(off), &p).unwrap();
        region.write(ByteLen::from_usize(off + ps - 8), &p).unwrap();
    }
}

fn verify_pages<M: HostMemory>(mem: &M, from: usize, to: usize) {
    let ps = mem.page_size().bytes() as usize;
    let region = mem.region();
    let mut got = [0u8; 8];
    for off in (from..to).step_by(ps) {
        for at in [off, off + ps - 8] {
            region.read(ByteLen::from_usize(at), &mut got).unwrap();
            assert_eq!(got, pattern(off / ps), "page at {off:#x} lost its contents");
        }
    }
}

/// The host-state guards live in the library, shared with other crates'
/// tests.
#[allow(unused_imports)] // not every test file reserves pages
pub use ramblock_linux::hugetlb::PoolReservation as HugepagePool;

/// A hugetlbfs mounted on a fresh directory for the test, unmounted and
/// removed when dropped.
pub struct HugetlbfsMount {
    pub dir: PathBuf,
}

impl HugetlbfsMount {
    pub fn mount(page_size: PageSize) -> Result<HugetlbfsMount, String> {
        let dir = std::env::temp_dir().join(format!(
            "ramblock-hugetlbfs-{}-{}",
            std::process::id(),
            page_size.bytes() >> 10
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {dir:?}: {e}"))?;
        let status = std::process::Command::new("mount")
            .args(["-t", "hugetlbfs", "-o"])
            .arg(format!("pagesize={}K", page_size.bytes() >> 10))
            .arg("none")
            .arg(&dir)
            .status()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !status.success() {
            let _ = std::fs::remove_dir(&dir);
            return Err(format!("mount -t hugetlbfs on {dir:?} failed ({status})"));
        }
        Ok(HugetlbfsMount { dir })
    }
}

impl Drop for HugetlbfsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A fresh scratch directory on the ordinary filesystem, removed on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(tag: &str) -> ScratchDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("ramblock-test-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        ScratchDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits (bounded: 20 s) until `cond`; false if it never held.
pub fn wait_for(cond: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !cond() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::yield_now();
    }
    true
}

/// Prints the one `skipped:` line.
pub fn skip(reason: &str) {
    println!("skipped: {reason}");
}
