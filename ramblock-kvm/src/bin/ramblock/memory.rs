//! Guest RAM for the program: one `pc.ram` block over the chosen backing.

use crate::options::Backing;
use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::bitmap::Owned;
use ramblock_core::block::{BlockBitmaps, BlockSpec};
use ramblock_core::checksum::{Ledger, PageLedger};
use ramblock_core::flags::BlockFlags;
use ramblock_core::list::RamList;
use ramblock_core::name::BlockName;
use ramblock_kvm::mode::DirtyLogRequest;
use ramblock_kvm::vm::{Vm, VmBuilder};
use ramblock_linux::{LinuxMemory, MemoryBuilder, Prealloc};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The VMs that guest_memfd RAM was created for, by the list's address: a
/// guest_memfd belongs to the VM that made it, so `kvm::start` and
/// `kvm::prepare_destination` run the guest in that VM ([`take_vm`]).
static GUEST_MEMFD_VMS: Mutex<Vec<(usize, Arc<Vm>)>> = Mutex::new(Vec::new());

/// The VM `ram`'s guest_memfd was created for, if it has one.
pub fn take_vm(ram: &GuestRam) -> Option<Arc<Vm>> {
    let mut vms = GUEST_MEMFD_VMS.lock().unwrap_or_else(|e| e.into_inner());
    let at = vms
        .iter()
        .position(|(k, _)| *k == ram as *const GuestRam as usize)?;
    Some(vms.swap_remove(at).1)
}

/// The block lists the program uses (a VM has few blocks).
pub type GuestRam = RamList<'static, LinuxMemory, Owned, 8>;

/// The name of the guest's main RAM block.
pub const RAM_BLOCK: &str = "pc.ram";

/// Which side the memory is for.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Side {
    /// The source: the guest touches its own memory.
    Source,
    /// A destination in another process: preallocated before the migration
    /// starts, so received pages do not pay for first-touch faults.
    Destination,
    /// A destination in the same process as its source: preallocated too,
    /// and never sharing a named file with the source.
    LocalDestination,
    /// A destination (in either process) that is not preallocated: a
    /// post-copy one, as pages that never arrived must stay missing for
    /// userfaultfd to see, or one asked to populate as pages arrive.
    LazyDestination,
}

/// Builds `size` bytes of guest RAM over `backing` and returns a list
/// holding it as `pc.ram`. A guest_memfd backing creates its VM here, with
/// `dirty_log`, for [`take_vm`].
pub fn guest_ram(
    size: u64,
    backing: &Backing,
    clear_shift: u8,
    side: Side,
    dirty_log: DirtyLogRequest,
) -> Result<&'static GuestRam, String> {
    let len = ByteLen(size);
    let mut vm = None;
    let builder = match backing {
        Backing::Anonymous => MemoryBuilder::anonymous(len).transparent_hugepages(true),
        Backing::Memfd => MemoryBuilder::memfd(len).name(RAM_BLOCK),
        Backing::Hugetlb => MemoryBuilder::hugetlb(len, PageSize::SIZE_2M),
        Backing::HugetlbMemfd => MemoryBuilder::memfd(len)
            .huge_pages(PageSize::SIZE_2M)
            .name(RAM_BLOCK),
        Backing::File(path) => {
            // Two blocks in one process never share a file: the local
            // destination gets an unlinked file beside the source's.
            let path = match side {
                Side::LocalDestination | Side::LazyDestination if !path.is_dir() => path
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
                    .to_path_buf(),
                _ => path.clone(),
            };
            MemoryBuilder::file(path, len).shared(true)
        }
        Backing::GuestMemfd => {
            let made = VmBuilder::new()
                .dirty_log(dirty_log)
                .build()
                .map_err(|e| format!("guest_memfd RAM needs a KVM VM: {e}"))?;
            let fd = made.create_guest_memfd(size).map_err(|e| e.to_string())?;
            vm = Some(Arc::new(made));
            MemoryBuilder::guest_memfd(fd, len)
        }
    };
    let builder = match side {
        Side::Source | Side::LazyDestination => builder,
        Side::Destination | Side::LocalDestination => builder.prealloc(Prealloc::default()),
    };
    let memory = builder
        .build()
        .map_err(|e| format!("cannot allocate {size:#x} bytes of guest RAM: {e}"))?;
    let flags = BlockFlags::MIGRATABLE | memory.flags();
    let spec = BlockSpec::new(BlockName::new(RAM_BLOCK).expect("valid name"), len)
        .flags(flags)
        .clear_shift(clear_shift);
    let bitmaps = BlockBitmaps::for_spec(&spec).map_err(|e| e.to_string())?;
    let list: &'static GuestRam = Box::leak(Box::new(RamList::new()));
    list.add(spec, memory, bitmaps)
        .map_err(|e| format!("cannot add {RAM_BLOCK}: {e}"))?;
    if let Some(vm) = vm {
        GUEST_MEMFD_VMS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((list as *const GuestRam as usize, vm));
    }
    Ok(list)
}

/// A page ledger for `ram`'s one block (table index 0), its room made
/// now: before the migration's clock starts, not page by page during it.
pub fn ledger_for(ram: &GuestRam) -> Ledger {
    let mut ledger = Ledger::new();
    if let Some(block) = ram.read().by_name(RAM_BLOCK) {
        ledger.reserve(0, block.used_pages() as u64);
    }
    ledger
}

/// The first page whose contents differ between `a` and `b` (same block
/// names), or `None` when the RAM is identical.
pub fn first_mismatch(a: &GuestRam, b: &GuestRam) -> Option<(String, u64)> {
    let (va, vb) = (a.read(), b.read());
    let mut pa = vec![0u8; 1 << 20];
    let mut pb = vec![0u8; 1 << 20];
    for block in va.iter() {
        let Some(other) = vb.by_name(block.name()) else {
            return Some((block.name().to_string(), 0));
        };
        if other.used_length() != block.used_length() {
            return Some((
                block.name().to_string(),
                other.used_length().0.min(block.used_length().0) >> 12,
            ));
        }
        let (ra, rb) = (block.region(), other.region());
        let len = block.used_length().0;
        let mut at = 0;
        while at < len {
            let n = (len - at).min(pa.len() as u64) as usize;
            ra.read(ByteLen(at), &mut pa[..n]).ok()?;
            rb.read(ByteLen(at), &mut pb[..n]).ok()?;
            if pa[..n] != pb[..n] {
                let page = pa[..n]
                    .chunks(4096)
                    .zip(pb[..n].chunks(4096))
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                return Some((block.name().to_string(), (at >> 12) + page as u64));
            }
            at += n as u64;
        }
    }
    None
}
