//! [`Vm`]: a KVM virtual machine whose guest RAM is ramblock blocks.
//!
//! The VM owns the slot table (ids, ranges, each slot's dirty-log buffers)
//! and, in ring mode, every vCPU's dirty ring. It is `Sync`: vCPU threads
//! drain rings on ring-full exits while the migration thread harvests.
//! Lock order: rings, then slots.

use crate::caps::{Capabilities, MANUAL_PROTECT_WANTED};
use crate::error::KvmError;
use crate::memslot::{BlockRange, Slot, SlotId, SlotLog, SlotTable};
use crate::mode::{DirtyLogMode, DirtyLogRequest};
use crate::sys::{self, DirtyRing};
use crate::vcpu::Vcpu;
use kvm_bindings::{
    kvm_enable_cap, kvm_userspace_memory_region, kvm_userspace_memory_region2,
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
};
use kvm_ioctls::{Kvm, VmFd};
use nix::errno::Errno;
use ramblock_core::addr::RamAddr;
use ramblock_core::bitmap::{MigrationBitmap, Storage, WORD_BITS};
use ramblock_core::block::RamBlock;
use ramblock_core::dirty_log::BlockInfo;
use ramblock_core::flags::BlockFlags;
use ramblock_core::host::HostMemory;
use ramblock_core::listener::RamListener;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Mutex, MutexGuard};

/// Where x86 KVM puts the three pages it needs for real-mode emulation on
/// hosts without unrestricted guests: just under 4 GiB, outside any RAM the
/// test guests map (the address QEMU and Firecracker use).
const TSS_ADDRESS: usize = 0xfffb_d000;

/// Builds a [`Vm`].
#[derive(Copy, Clone, Debug, Default)]
pub struct VmBuilder {
    request: DirtyLogRequest,
}

impl VmBuilder {
    /// A builder with the dirty-log mode picked from the host.
    pub fn new() -> VmBuilder {
        VmBuilder::default()
    }

    /// Overrides the dirty-log mode.
    pub fn dirty_log(mut self, request: DirtyLogRequest) -> VmBuilder {
        self.request = request;
        self
    }

    /// Opens `/dev/kvm`, creates the VM and switches on its dirty-log mode.
    pub fn build(self) -> Result<Vm, KvmError> {
        let kvm = Kvm::new().map_err(|e| KvmError::Open {
            what: "open /dev/kvm",
            errno: Errno::from_raw(e.errno()),
        })?;
        let fd = kvm.create_vm().map_err(|e| KvmError::Open {
            what: "create a VM (KVM_CREATE_VM)",
            errno: Errno::from_raw(e.errno()),
        })?;
        let caps = Capabilities::probe(&fd);
        let mode = self.request.resolve(&caps)?;
        let mut ring_acq_rel = false;
        match mode {
            DirtyLogMode::Bitmap => {}
            DirtyLogMode::ManualProtect => {
                enable_cap(
                    &fd,
                    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    MANUAL_PROTECT_WANTED.into(),
                )
                .map_err(|e| KvmError::ioctl("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)", e))?;
            }
            DirtyLogMode::Ring { entries } => {
                ring_acq_rel = caps.dirty_ring_acq_rel_max_bytes > 0;
                let (cap, max) = if ring_acq_rel {
                    (
                        KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
                        caps.dirty_ring_acq_rel_max_bytes,
                    )
                } else {
                    (KVM_CAP_DIRTY_LOG_RING, caps.dirty_ring_max_bytes)
                };
                let entry = std::mem::size_of::<kvm_bindings::kvm_dirty_gfn>() as u64;
                let bytes = u64::from(entries) * entry;
                if !entries.is_power_of_two() || bytes > u64::from(max) {
                    return Err(KvmError::RingSize {
                        entries,
                        why: format!(
                            "it must be a power of two of at most {} entries on this host",
                            u64::from(max) / entry
                        ),
                    });
                }
                enable_cap(&fd, cap, bytes).map_err(|errno| match errno {
                    Errno::EINVAL => KvmError::RingSize {
                        entries,
                        why: "KVM refused it (EINVAL): it is below the kernel's minimum (one \
                              page, and more than the entries KVM reserves per vCPU); use a \
                              larger power of two"
                            .into(),
                    },
                    errno => {
                        KvmError::ioctl(format!("KVM_ENABLE_CAP(dirty ring, {bytes} B)"), errno)
                    }
                })?;
            }
        }
        #[cfg(target_arch = "x86_64")]
        fd.set_tss_address(TSS_ADDRESS)
            .map_err(|e| KvmError::from_kvm("KVM_SET_TSS_ADDR", e))?;
        Ok(Vm {
            _kvm: kvm,
            fd,
            caps,
            mode,
            ring_acq_rel,
            slots: Mutex::new(SlotTable::new(caps.memslots)),
            rings: Mutex::new(Vec::new()),
            listener_error: Mutex::new(None),
        })
    }
}

fn enable_cap(fd: &VmFd, cap: u32, arg0: u64) -> Result<(), Errno> {
    let mut c = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    c.args[0] = arg0;
    fd.enable_cap(&c).map_err(|e| Errno::from_raw(e.errno()))
}

/// A snapshot of one slot, for callers and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    /// The KVM slot id.
    pub id: SlotId,
    /// Guest-physical start.
    pub gpa: u64,
    /// Bytes mapped.
    pub len: u64,
    /// The block's RAM address.
    pub block: RamAddr,
    /// The block page the slot starts at.
    pub first_page: u64,
    /// Read-only slot.
    pub read_only: bool,
    /// Dirty logging on.
    pub logging: bool,
}

/// A KVM VM; see the module docs.
#[derive(Debug)]
pub struct Vm {
    _kvm: Kvm,
    fd: VmFd,
    caps: Capabilities,
    mode: DirtyLogMode,
    ring_acq_rel: bool,
    slots: Mutex<SlotTable>,
    rings: Mutex<Vec<DirtyRing>>,
    listener_error: Mutex<Option<KvmError>>,
}

/// Locks `m`, carrying on if a thread panicked while holding it: the tables
/// stay consistent because every update is a single assignment at the end.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Vm {
    /// A VM with the dirty-log mode picked from the host.
    pub fn new() -> Result<Vm, KvmError> {
        VmBuilder::new().build()
    }

    /// What the host's KVM offers.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// The dirty-log mode in use.
    pub fn mode(&self) -> DirtyLogMode {
        self.mode
    }

    /// Whether the ring uses the acquire/release variant.
    pub fn ring_acq_rel(&self) -> bool {
        self.ring_acq_rel
    }

    /// The kvm-ioctls VM fd, for calls ramblock does not wrap.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    fn raw(&self) -> BorrowedFd<'_> {
        // SAFETY: `self.fd` owns the descriptor and outlives the borrow.
        unsafe { BorrowedFd::borrow_raw(self.fd.as_raw_fd()) }
    }

    /// The slots, by id.
    pub fn slots(&self) -> Vec<SlotInfo> {
        lock(&self.slots)
            .iter()
            .map(|s| SlotInfo {
                id: s.id,
                gpa: s.gpa,
                len: s.len,
                block: s.block,
                first_page: s.first_page,
                read_only: s.read_only,
                logging: s.logging,
            })
            .collect()
    }

    /// Issues the region ioctl for `slot` with `len` bytes (0 deletes it).
    fn set_region(&self, slot: &Slot, len: u64) -> Result<(), KvmError> {
        let what = || {
            format!(
                "KVM_SET_USER_MEMORY_REGION{} (slot {}, gpa {:#x}, {:#x} bytes, flags {:#x})",
                if self.caps.user_memory2 { "2" } else { "" },
                slot.id.0,
                slot.gpa,
                len,
                slot.kvm_flags()
            )
        };
        let result = if self.caps.user_memory2 {
            let region = kvm_userspace_memory_region2 {
                slot: slot.id.0,
                flags: slot.kvm_flags(),
                guest_phys_addr: slot.gpa,
                memory_size: len,
                userspace_addr: slot.host,
                ..Default::default()
            };
            // SAFETY: `slot.host .. + len` is host memory of a block that
            // `map_block`'s caller keeps mapped until the slot is removed.
            unsafe { self.fd.set_user_memory_region2(region) }
        } else {
            let region = kvm_userspace_memory_region {
                slot: slot.id.0,
                flags: slot.kvm_flags(),
                guest_phys_addr: slot.gpa,
                memory_size: len,
                userspace_addr: slot.host,
            };
            // SAFETY: as above.
            unsafe { self.fd.set_user_memory_region(region) }
        };
        result.map_err(|e| KvmError::from_kvm(what(), e))
    }

    /// Maps `range` of `block` at guest-physical `gpa` as a new memslot,
    /// read-only if the block is, with dirty logging off.
    ///
    /// # Safety
    /// The block's host memory must stay mapped at the same address until
    /// the slot is removed ([`Vm::unmap`], [`Vm::unmap_block`], or by
    /// registering the VM as a [`RamListener`] of the block's list, which
    /// unmaps a block's slots when the list removes it): the guest writes
    /// through the slot into whatever lives at that address.
    pub unsafe fn map_block<M: HostMemory, S: Storage>(
        &self,
        block: &RamBlock<M, S>,
        gpa: u64,
        range: BlockRange,
    ) -> Result<SlotId, KvmError> {
        let used = block.used_pages() as u64;
        let (first, count) = match range {
            BlockRange::Whole => (0, used),
            BlockRange::Pages { first, count } => (first, count),
        };
        if count == 0 || first.checked_add(count).is_none_or(|end| end > used) {
            return Err(KvmError::Range {
                block: block.name().into(),
                first,
                count,
                used,
            });
        }
        let read_only = block.flags().contains(BlockFlags::READ_ONLY);
        if read_only && !self.caps.readonly_mem {
            return Err(KvmError::ReadOnlyUnsupported(block.name().into()));
        }
        let mut slots = lock(&self.slots);
        let len = count << 12;
        slots.check_range(gpa, len, None)?;
        let slot = Slot {
            id: slots.next_id()?,
            gpa,
            len,
            host: block.region().as_ptr() as u64 + (first << 12),
            block: block.offset(),
            block_name: block.name().into(),
            first_page: first,
            range,
            read_only,
            logging: false,
            log: SlotLog::default(),
        };
        self.set_region(&slot, len)?;
        slots.insert(slot)
    }

    /// Switches dirty logging of slot `id` on or off, keeping the slot.
    /// Turning it on allocates the slot's log buffers, so harvests never
    /// allocate; turning it off drops pages logged and not yet harvested.
    /// A read-only slot has nothing to log and stays as it is.
    pub fn set_logging(&self, id: SlotId, on: bool) -> Result<(), KvmError> {
        let mut slots = lock(&self.slots);
        let slot = slots.get_mut(id).ok_or(KvmError::UnknownSlot(id.0))?;
        if slot.read_only || slot.logging == on {
            return Ok(());
        }
        slot.logging = on;
        if let Err(e) = self.set_region(slot, slot.len) {
            slot.logging = !on;
            return Err(e);
        }
        slot.log = if on {
            SlotLog::sized(slot.pages())
        } else {
            SlotLog::default()
        };
        Ok(())
    }

    /// [`Vm::set_logging`] for every slot of the block at `block`.
    pub fn set_block_logging(&self, block: RamAddr, on: bool) -> Result<(), KvmError> {
        let ids: Vec<SlotId> = lock(&self.slots).ids_of_block(block).collect();
        ids.into_iter().try_for_each(|id| self.set_logging(id, on))
    }

    /// Removes slot `id`; the guest no longer sees that memory.
    pub fn unmap(&self, id: SlotId) -> Result<(), KvmError> {
        let mut slots = lock(&self.slots);
        let slot = slots.get(id).ok_or(KvmError::UnknownSlot(id.0))?;
        self.set_region(slot, 0)?;
        slots.remove(id).map(drop)
    }

    /// Removes every slot of the block at `block`.
    pub fn unmap_block(&self, block: RamAddr) -> Result<(), KvmError> {
        let ids: Vec<SlotId> = lock(&self.slots).ids_of_block(block).collect();
        ids.into_iter().try_for_each(|id| self.unmap(id))
    }

    /// Makes the slots that map all of `block` ([`BlockRange::Whole`])
    /// follow its new used length. KVM cannot resize a slot, so each is
    /// deleted and re-created under the same id; pages logged dirty in the
    /// old slot are saved first and reported by the next harvest.
    pub fn block_resized<M: HostMemory, S: Storage>(
        &self,
        block: &RamBlock<M, S>,
    ) -> Result<(), KvmError> {
        if !self.mode.uses_bitmap() {
            self.collect_dirty_rings()?;
        }
        let mut slots = lock(&self.slots);
        let ids: Vec<SlotId> = slots.ids_of_block(block.offset()).collect();
        let len = block.used_length().0;
        for id in ids {
            let Some(slot) = slots.get(id) else { continue };
            if slot.range != BlockRange::Whole || slot.len == len {
                continue;
            }
            slots.check_range(slot.gpa, len, Some(id))?;
            let Some(slot) = slots.get_mut(id) else {
                continue;
            };
            if slot.logging && self.mode.uses_bitmap() {
                sys::get_dirty_log(self.raw(), id.0, &mut slot.log.buf).map_err(|e| {
                    KvmError::ioctl(format!("KVM_GET_DIRTY_LOG (slot {})", id.0), e)
                })?;
                let saved = std::mem::take(&mut slot.log.buf);
                slot.log.stash(&saved);
                slot.log.buf = saved;
            }
            self.set_region(slot, 0)?;
            let old = slot.len;
            slot.len = len;
            if let Err(e) = self.set_region(slot, len) {
                slot.len = old;
                // The old slot is gone: forget it rather than keep a record
                // KVM no longer has.
                slots.remove(id)?;
                return Err(e);
            }
            slot.host = block.region().as_ptr() as u64;
            let pages = slot.pages();
            slot.log.resize(pages);
            // The new slot's log starts afresh: nothing of it is harvested.
            slot.log.harvested.fill(0);
        }
        Ok(())
    }

    /// The first error a [`RamListener`] callback met, taken.
    pub fn take_listener_error(&self) -> Option<KvmError> {
        lock(&self.listener_error).take()
    }

    /// Creates vCPU `id`; in ring mode, maps its dirty ring.
    pub fn create_vcpu(&self, id: u64) -> Result<Vcpu, KvmError> {
        let fd = self
            .fd
            .create_vcpu(id)
            .map_err(|e| KvmError::from_kvm(format!("KVM_CREATE_VCPU({id})"), e))?;
        // Everything the host supports, so a guest may enter long mode:
        // KVM refuses EFER.LME for a vCPU whose CPUID lacks it.
        let cpuid = self
            ._kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| KvmError::from_kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        fd.set_cpuid2(&cpuid)
            .map_err(|e| KvmError::from_kvm(format!("KVM_SET_CPUID2 (vCPU {id})"), e))?;
        if let DirtyLogMode::Ring { entries } = self.mode {
            // SAFETY: `fd` owns the vCPU descriptor and outlives the borrow.
            let raw = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
            let ring = DirtyRing::map(raw, entries)
                .map_err(|e| KvmError::ioctl(format!("mmap of vCPU {id}'s dirty ring"), e))?;
            lock(&self.rings).push(ring);
        }
        Ok(Vcpu::new(fd, id))
    }

    /// Ring mode: drains every vCPU's ring into the slots' pending bits and
    /// re-arms the collected pages with `KVM_RESET_DIRTY_RINGS`. Returns how
    /// many entries were collected. Entries still in a running vCPU's
    /// hardware log (Intel PML) appear at its next exit, so the final
    /// harvest of a migration runs with the vCPUs stopped.
    pub fn collect_dirty_rings(&self) -> Result<u64, KvmError> {
        let mut rings = lock(&self.rings);
        let mut slots = lock(&self.slots);
        let mut total = 0u64;
        for ring in rings.iter_mut() {
            total += u64::from(ring.collect(|e| {
                // Only address space 0 (no SMM) is mapped.
                if e.slot >> 16 != 0 {
                    return;
                }
                if let Some(slot) = slots.get_mut(SlotId(e.slot & 0xffff)) {
                    if slot.logging && e.offset < slot.pages() {
                        let (w, b) = (e.offset as usize / WORD_BITS, e.offset % 64);
                        slot.log.pending[w] |= 1 << b;
                        slot.log.pending_any = true;
                    }
                }
            }));
        }
        if total > 0 {
            sys::reset_dirty_rings(self.raw())
                .map_err(|e| KvmError::ioctl("KVM_RESET_DIRTY_RINGS", e))?;
        }
        Ok(total)
    }

    /// Merges the log of every logging slot of `block` into `into`; see the
    /// `dirty` module for the modes.
    pub(crate) fn harvest_slots(
        &self,
        block: &BlockInfo<'_>,
        into: &mut MigrationBitmap<&mut [u64]>,
    ) -> Result<u64, KvmError> {
        let mut slots = lock(&self.slots);
        let mut newly = 0;
        for slot in slots.iter_mut() {
            if slot.block != block.offset || !slot.logging {
                continue;
            }
            let id = slot.id.0;
            if self.mode.uses_bitmap() {
                sys::get_dirty_log(self.raw(), id, &mut slot.log.buf)
                    .map_err(|e| KvmError::ioctl(format!("KVM_GET_DIRTY_LOG (slot {id})"), e))?;
                if self.mode == DirtyLogMode::ManualProtect {
                    for (h, b) in slot.log.harvested.iter_mut().zip(&slot.log.buf) {
                        *h |= *b;
                    }
                }
                newly += merge(slot, into, block, false)?;
            }
            if slot.log.pending_any {
                newly += merge(slot, into, block, true)?;
                slot.log.pending.fill(0);
                slot.log.pending_any = false;
            }
        }
        Ok(newly)
    }

    /// Manual protect: re-protects the harvested pages among `count` pages
    /// of `block` from `first`, with `KVM_CLEAR_DIRTY_LOG` over 64-page
    /// aligned ranges whose bitmap holds only those pages.
    pub(crate) fn clear_harvested(
        &self,
        block: &BlockInfo<'_>,
        first: usize,
        count: usize,
    ) -> Result<(), KvmError> {
        let (first, end) = (first as u64, first as u64 + count as u64);
        let mut slots = lock(&self.slots);
        for slot in slots.iter_mut() {
            if slot.block != block.offset || !slot.logging {
                continue;
            }
            // The part of the request inside this slot.
            let start = first.max(slot.first_page);
            let stop = end.min(slot.first_page + slot.pages());
            if start >= stop {
                continue;
            }
            let (lo, hi) = (start - slot.first_page, stop - slot.first_page);
            clear_slot_range(self.raw(), slot, lo, hi)?;
        }
        Ok(())
    }
}

/// ORs the slot's fetched log (`pending == false`) or its pending bits into
/// `into` at the slot's place in the block.
fn merge(
    slot: &Slot,
    into: &mut MigrationBitmap<&mut [u64]>,
    block: &BlockInfo<'_>,
    pending: bool,
) -> Result<u64, KvmError> {
    let words = if pending {
        &slot.log.pending
    } else {
        &slot.log.buf
    };
    merge_nonzero(into, slot.first_page as usize, words, slot.pages() as usize).map_err(|_| {
        KvmError::Bitmap {
            slot: slot.id.0,
            block: block.name.into(),
            first: slot.first_page,
            count: slot.pages(),
            len: into.len() as u64,
        }
    })
}

/// `into.merge_log(first, words, bits)`, but only over the runs of 8-word
/// groups that have a bit set. A log is mostly zeros; finding them with a
/// plain OR (which vectorizes) is several times cheaper than merging them,
/// which counts newly-set bits word by word.
fn merge_nonzero(
    into: &mut MigrationBitmap<&mut [u64]>,
    first: usize,
    words: &[u64],
    bits: usize,
) -> Result<u64, ramblock_core::bitmap::BitRangeError> {
    const GROUP: usize = 8;
    let words = &words[..bits.div_ceil(WORD_BITS).min(words.len())];
    let nonzero = |at: usize| {
        let end = (at + GROUP).min(words.len());
        (words[at..end].iter().fold(0, |acc, &w| acc | w) != 0, end)
    };
    let (mut newly, mut i) = (0, 0);
    while i < words.len() {
        let (any, end) = nonzero(i);
        if !any {
            i = end;
            continue;
        }
        let start = i;
        i = end;
        while i < words.len() {
            let (any, end) = nonzero(i);
            if !any {
                break;
            }
            i = end;
        }
        let run_bits = (i * WORD_BITS).min(bits) - start * WORD_BITS;
        newly += into.merge_log(first + start * WORD_BITS, &words[start..i], run_bits)?;
    }
    Ok(newly)
}

/// Issues `KVM_CLEAR_DIRTY_LOG` for slot pages `lo..hi`: the range is widened
/// to 64-page words (as KVM requires), but the bitmap passed holds only bits
/// inside `lo..hi` that were harvested, which are then forgotten.
fn clear_slot_range(vm: BorrowedFd<'_>, slot: &mut Slot, lo: u64, hi: u64) -> Result<(), KvmError> {
    /// Words per ioctl: 2^20 words = 2^26 pages (256 GiB), well within u32.
    const MAX_WORDS: usize = 1 << 20;
    let pages = slot.pages();
    let (w_lo, w_hi) = ((lo / 64) as usize, hi.div_ceil(64) as usize);
    let mut w = w_lo;
    while w < w_hi {
        let n = (w_hi - w).min(MAX_WORDS);
        let SlotLog { buf, harvested, .. } = &mut slot.log;
        let mut any = 0;
        for (i, out) in buf[..n].iter_mut().enumerate() {
            let word = w + i;
            let bit0 = word as u64 * 64;
            let mut mask = !0u64;
            if lo > bit0 {
                mask &= !0u64 << (lo - bit0);
            }
            if hi < bit0 + 64 {
                mask &= !0u64 >> (bit0 + 64 - hi);
            }
            let take = harvested[word] & mask;
            harvested[word] &= !take;
            *out = take;
            any |= take;
        }
        if any != 0 {
            let first_page = w as u64 * 64;
            let num_pages = ((w + n) as u64 * 64).min(pages) - first_page;
            sys::clear_dirty_log(vm, slot.id.0, first_page, num_pages as u32, &mut buf[..n])
                .map_err(|e| {
                    KvmError::ioctl(
                        format!(
                            "KVM_CLEAR_DIRTY_LOG (slot {}, pages {first_page}..+{num_pages})",
                            slot.id.0
                        ),
                        e,
                    )
                })?;
        }
        w += n;
    }
    Ok(())
}

impl<M: HostMemory, S: Storage> RamListener<M, S> for Vm {
    fn block_removed(&self, block: &RamBlock<M, S>) {
        if let Err(e) = self.unmap_block(block.offset()) {
            lock(&self.listener_error).get_or_insert(e);
        }
    }

    fn block_resized(
        &self,
        block: &RamBlock<M, S>,
        _old: ramblock_core::addr::ByteLen,
        _new: ramblock_core::addr::ByteLen,
    ) {
        if let Err(e) = Vm::block_resized(self, block) {
            lock(&self.listener_error).get_or_insert(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_only_nonzero_groups_equals_merging_everything() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for bits in [1usize, 63, 64, 65, 511, 512, 1000, 4096] {
            for first in [0usize, 3, 64, 130] {
                let words: Vec<u64> = (0..bits.div_ceil(64))
                    .map(|_| match next() % 4 {
                        0 => next() & next(),
                        1 => !0,
                        _ => 0,
                    })
                    .collect();
                let len = first + bits + 7;
                let (mut a, mut b) = (vec![0u64; len.div_ceil(64)], vec![0u64; len.div_ceil(64)]);
                let mut ma = MigrationBitmap::new(&mut a[..], len).unwrap();
                let mut mb = MigrationBitmap::new(&mut b[..], len).unwrap();
                ma.set_range(first, 1).unwrap();
                mb.set_range(first, 1).unwrap();
                let want = mb.merge_log(first, &words, bits).unwrap();
                assert_eq!(merge_nonzero(&mut ma, first, &words, bits).unwrap(), want);
                assert_eq!(ma.words(), mb.words(), "bits {bits} first {first}");
                assert_eq!(ma.dirty_count(), mb.dirty_count());
            }
        }
    }
}
