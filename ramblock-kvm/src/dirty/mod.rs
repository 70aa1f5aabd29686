//! KVM's three dirty-log modes behind the core's [`DirtyLogSource`].
//!
//! Each mode's kernel work lives in one module, which enables the mode on
//! the VM, owns its ioctls and knows what a harvest fetches:
//!
//! - [`bitmap`] ([`BitmapLog`]): `KVM_GET_DIRTY_LOG` per slot into the
//!   slot's reused buffer (fetch, clear and re-protect in one call).
//! - [`manual`] ([`ManualProtectLog`]): the same fetch, which in this mode
//!   neither clears nor re-protects; the bits fetched are remembered per
//!   slot, the core's clear map records the harvested chunks, and
//!   [`DirtyLogSource::clear`] re-protects exactly those remembered bits of a
//!   chunk with `KVM_CLEAR_DIRTY_LOG` just before its first page is sent.
//! - [`ring`] ([`RingLog`]): maps every vCPU's dirty ring, drains the rings
//!   into per-slot pending bits (also done by [`crate::vcpu::Vcpu::run`]
//!   when a ring fills), and resets them.
//!
//! A [`Vm`] enables one mode when it is built and keeps it as a
//! `ModeKernel`; everything else here (the slot loop of a harvest, the
//! merge into the migration bitmap) is the same for all three and never
//! asks which mode it runs. [`KvmDirtyLog`] is whichever of the three
//! typed logs the VM was created with. In every mode the slot's pending
//! bits (pages saved when a slot was re-created, drained ring entries) are
//! merged too. None of them allocates.

pub mod bitmap;
pub mod manual;
pub mod ring;

pub use bitmap::BitmapLog;
pub use manual::ManualProtectLog;
pub use ring::RingLog;

use crate::caps::Capabilities;
use crate::error::KvmError;
use crate::lock;
use crate::memslot::{Slot, SlotTable};
use crate::mode::DirtyLogMode;
use crate::vm::Vm;
use kvm_bindings::kvm_enable_cap;
use kvm_ioctls::{VcpuFd, VmFd};
use nix::errno::Errno;
use ramblock_core::bitmap::{MigrationBitmap, WORD_BITS};
use ramblock_core::dirty_log::{BlockInfo, DirtyLogSource};
use std::fmt;
use std::sync::Mutex;

/// `KVMIO` from `<linux/kvm.h>`, for the ioctls kvm-ioctls lacks
/// (`KVM_CLEAR_DIRTY_LOG`, `KVM_RESET_DIRTY_RINGS`, and `KVM_GET_DIRTY_LOG`
/// into a caller's buffer). nix's macros build their numbers over
/// kvm-bindings' structs, so the sizes are checked at compile time.
const KVMIO: u8 = 0xAE;

/// `KVM_ENABLE_CAP(cap)` with `arg0`.
fn enable_cap(fd: &VmFd, cap: u32, arg0: u64) -> Result<(), Errno> {
    let mut c = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    c.args[0] = arg0;
    fd.enable_cap(&c).map_err(|e| Errno::from_raw(e.errno()))
}

/// The kernel side of one dirty-log mode, enabled on a VM when it is built
/// ([`enable`]). The VM calls these at the points every mode shares (a
/// vCPU created, a harvest, a slot about to be re-created, a clear); each
/// mode does its part and the defaults do nothing.
pub(crate) trait ModeKernel: fmt::Debug + Send + Sync {
    /// The mode.
    fn mode(&self) -> DirtyLogMode;

    /// Whether the ring uses the acquire/release variant.
    fn ring_acq_rel(&self) -> bool {
        false
    }

    /// Whether harvested pages stay unprotected until cleared
    /// ([`DirtyLogSource::needs_clear`]).
    fn needs_clear(&self) -> bool {
        false
    }

    /// Whether the log must be reaped while vCPUs run (a full ring stops
    /// its vCPU until it is), not only at each harvest.
    fn needs_reaping(&self) -> bool {
        false
    }

    /// vCPU `id` of the VM was just created as `vcpu`.
    fn vcpu_created(&self, vcpu: &VcpuFd, id: u64) -> Result<(), KvmError> {
        let _ = (vcpu, id);
        Ok(())
    }

    /// Moves what the kernel logged outside the slots' own buffers (ring
    /// entries) into the slots' pending bits; returns how many entries it
    /// collected. Locks `slots` itself, after any lock of its own.
    fn collect(&self, vm: &VmFd, slots: &Mutex<SlotTable>) -> Result<u64, KvmError> {
        let _ = (vm, slots);
        Ok(0)
    }

    /// Fetches the kernel's log of the logging `slot` into `slot.log.buf`;
    /// returns whether it did (then the buffer is merged).
    fn fetch(&self, vm: &VmFd, slot: &mut Slot) -> Result<bool, KvmError>;

    /// Re-protects the harvested pages among slot pages `lo..hi`.
    fn clear(&self, vm: &VmFd, slot: &mut Slot, lo: u64, hi: u64) -> Result<(), KvmError> {
        let _ = (vm, slot, lo, hi);
        Ok(())
    }
}

/// Switches `mode` on for the new VM `fd` (with nothing mapped and no vCPU
/// yet) and returns its kernel side.
pub(crate) fn enable(
    fd: &VmFd,
    caps: &Capabilities,
    mode: DirtyLogMode,
) -> Result<Box<dyn ModeKernel>, KvmError> {
    Ok(match mode {
        DirtyLogMode::Bitmap => Box::new(bitmap::Bitmap),
        DirtyLogMode::ManualProtect => Box::new(manual::Manual::enable(fd)?),
        DirtyLogMode::Ring { entries } => Box::new(ring::Ring::enable(fd, caps, entries)?),
    })
}

/// Merges the log of every logging slot of `block` into `into`: whatever
/// the mode collects first, then per slot the fetched log and the pending
/// bits.
pub(crate) fn harvest(
    kernel: &dyn ModeKernel,
    vm: &VmFd,
    slots: &Mutex<SlotTable>,
    block: &BlockInfo<'_>,
    into: &mut MigrationBitmap<&mut [u64]>,
) -> Result<u64, KvmError> {
    kernel.collect(vm, slots)?;
    let mut slots = lock(slots);
    let mut newly = 0;
    for slot in slots.iter_mut() {
        if slot.block != block.offset || !slot.logging {
            continue;
        }
        if slot.always_dirty() {
            newly += into
                .set_range(slot.first_page as usize, slot.pages() as usize)
                .map_err(|_| bitmap_error(slot, block, into.len()))?;
            continue;
        }
        if kernel.fetch(vm, slot)? {
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

/// Re-protects the harvested pages among `count` pages of `block` from
/// `first`, in each logging slot that maps some of them.
pub(crate) fn clear(
    kernel: &dyn ModeKernel,
    vm: &VmFd,
    slots: &Mutex<SlotTable>,
    block: &BlockInfo<'_>,
    first: usize,
    count: usize,
) -> Result<(), KvmError> {
    let (first, end) = (first as u64, first as u64 + count as u64);
    let mut slots = lock(slots);
    for slot in slots.iter_mut() {
        if slot.block != block.offset || !slot.kernel_logs() {
            continue;
        }
        // The part of the request inside this slot.
        let start = first.max(slot.first_page);
        let stop = end.min(slot.first_page + slot.pages());
        if start >= stop {
            continue;
        }
        kernel.clear(vm, slot, start - slot.first_page, stop - slot.first_page)?;
    }
    Ok(())
}

/// Saves what the kernel logged for the logging `slot` into its pending
/// bits, before the slot is deleted to be re-created (the deletion drops
/// the kernel's log).
pub(crate) fn save_before_recreate(
    kernel: &dyn ModeKernel,
    vm: &VmFd,
    slot: &mut Slot,
) -> Result<(), KvmError> {
    if slot.kernel_logs() && kernel.fetch(vm, slot)? {
        let saved = std::mem::take(&mut slot.log.buf);
        slot.log.stash(&saved);
        slot.log.buf = saved;
    }
    Ok(())
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
    merge_nonzero(into, slot.first_page as usize, words, slot.pages() as usize)
        .map_err(|_| bitmap_error(slot, block, into.len()))
}

/// The slot's pages do not fit the block's bitmap `len` (a bug).
fn bitmap_error(slot: &Slot, block: &BlockInfo<'_>, len: usize) -> KvmError {
    KvmError::Bitmap {
        slot: slot.id.0,
        block: block.name.into(),
        first: slot.first_page,
        count: slot.pages(),
        len: len as u64,
    }
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

/// Checks that `vm` logs in `needed`'s mode, for the typed logs'
/// constructors: the one place a log asks which mode it runs in.
fn require(vm: &Vm, what: &'static str, needed: DirtyLogMode) -> Result<(), KvmError> {
    let active = vm.mode();
    let same = match (active, needed) {
        (DirtyLogMode::Ring { .. }, DirtyLogMode::Ring { .. }) => true,
        (a, n) => a == n,
    };
    if same {
        Ok(())
    } else {
        Err(KvmError::WrongMode {
            what,
            needed,
            active,
        })
    }
}

/// The dirty log of a VM in whatever mode it was created with.
#[derive(Copy, Clone, Debug)]
pub enum KvmDirtyLog<'vm> {
    /// [`BitmapLog`].
    Bitmap(BitmapLog<'vm>),
    /// [`ManualProtectLog`].
    ManualProtect(ManualProtectLog<'vm>),
    /// [`RingLog`].
    Ring(RingLog<'vm>),
}

impl<'vm> KvmDirtyLog<'vm> {
    /// The log of `vm` in its mode.
    pub fn new(vm: &'vm Vm) -> KvmDirtyLog<'vm> {
        match vm.mode() {
            DirtyLogMode::Bitmap => KvmDirtyLog::Bitmap(BitmapLog { vm }),
            DirtyLogMode::ManualProtect => KvmDirtyLog::ManualProtect(ManualProtectLog { vm }),
            DirtyLogMode::Ring { .. } => KvmDirtyLog::Ring(RingLog { vm }),
        }
    }
}

impl<'vm> KvmDirtyLog<'vm> {
    fn vm(&self) -> &'vm Vm {
        match *self {
            KvmDirtyLog::Bitmap(l) => l.vm,
            KvmDirtyLog::ManualProtect(l) => l.vm,
            KvmDirtyLog::Ring(l) => l.vm,
        }
    }
}

/// Implements [`DirtyLogSource`] for a log type, given how to reach the VM
/// it logs. Every mode shares one implementation: the mode's own kernel
/// work was chosen once, when the VM was built, and the VM dispatches to it.
macro_rules! vm_dirty_log_source {
    ($log:ident, |$this:ident| $vm:expr) => {
        impl DirtyLogSource for $log<'_> {
            type Error = KvmError;

            fn needs_clear(&self) -> bool {
                let $this = self;
                $vm.log_needs_clear()
            }

            fn harvest(
                &mut self,
                block: &BlockInfo<'_>,
                into: &mut MigrationBitmap<&mut [u64]>,
            ) -> Result<u64, KvmError> {
                let $this = &*self;
                $vm.harvest_slots(block, into)
            }

            fn clear(
                &mut self,
                block: &BlockInfo<'_>,
                first: usize,
                count: usize,
            ) -> Result<(), KvmError> {
                let $this = &*self;
                $vm.clear_harvested(block, first, count)
            }
        }
    };
}

vm_dirty_log_source!(KvmDirtyLog, |log| log.vm());
vm_dirty_log_source!(BitmapLog, |log| log.vm);
vm_dirty_log_source!(ManualProtectLog, |log| log.vm);
vm_dirty_log_source!(RingLog, |log| log.vm);

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
