//! Manual-protect mode (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with
//! initially-set bitmaps): `KVM_GET_DIRTY_LOG` only fetches, leaving the
//! pages writable; the bits fetched are remembered per slot, and
//! `KVM_CLEAR_DIRTY_LOG` re-protects exactly those bits of a range just
//! before its pages are sent.

use super::{bitmap, require, ModeKernel};
use crate::caps::MANUAL_PROTECT_WANTED;
use crate::error::KvmError;
use crate::memslot::{Slot, SlotLog};
use crate::mode::DirtyLogMode;
use crate::vm::Vm;
use kvm_bindings::{kvm_clear_dirty_log, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2};
use kvm_ioctls::VmFd;
use std::os::fd::AsRawFd;

/// The raw ioctl nix generates; see [`clear_dirty_log`].
#[allow(missing_docs, clippy::missing_safety_doc)]
mod raw {
    use super::*;
    // `#define KVM_CLEAR_DIRTY_LOG _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`:
    // read-write in the kernel's numbering, so `ioctl_readwrite!` (the
    // write-only macro would produce a different request number).
    nix::ioctl_readwrite!(
        kvm_clear_dirty_log,
        crate::dirty::KVMIO,
        0xc0,
        kvm_clear_dirty_log
    );
}

/// `KVM_CLEAR_DIRTY_LOG`: re-protects the pages of `slot` whose bits are set
/// in `bitmap`, which covers `num_pages` pages from `first_page`.
/// `first_page` must be a multiple of 64 and `num_pages` a multiple of 64 or
/// reach the slot's end; the kernel checks both (`EINVAL`), and this checks
/// that `bitmap` holds `num_pages` bits (`EINVAL` too).
fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> nix::Result<()> {
    if bitmap.len() * 64 < num_pages as usize {
        return Err(nix::errno::Errno::EINVAL);
    }
    let mut clear = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
            // The kernel only reads the bitmap (copy_from_user).
            dirty_bitmap: bitmap.as_ptr().cast_mut().cast(),
        },
    };
    // SAFETY: `vm` is a KVM VM fd, so the request means KVM_CLEAR_DIRTY_LOG;
    // the kernel reads `num_pages` bits from `bitmap`, which was checked
    // above to hold at least that many, and writes nothing there.
    unsafe { raw::kvm_clear_dirty_log(vm.as_raw_fd(), &mut clear) }.map(drop)
}

/// Manual-protect mode's kernel side.
#[derive(Debug)]
pub(crate) struct Manual;

impl Manual {
    /// `KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)` with initially-set
    /// bitmaps.
    pub(crate) fn enable(fd: &VmFd) -> Result<Manual, KvmError> {
        super::enable_cap(
            fd,
            KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            MANUAL_PROTECT_WANTED.into(),
        )
        .map_err(|e| KvmError::ioctl("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)", e))?;
        Ok(Manual)
    }
}

impl ModeKernel for Manual {
    fn mode(&self) -> DirtyLogMode {
        DirtyLogMode::ManualProtect
    }

    fn needs_clear(&self) -> bool {
        true
    }

    /// The fetch leaves the pages writable: remember what it reported, so
    /// [`ModeKernel::clear`] re-protects exactly that.
    fn fetch(&self, vm: &VmFd, slot: &mut Slot) -> Result<bool, KvmError> {
        bitmap::fetch(vm, slot)?;
        for (h, b) in slot.log.harvested.iter_mut().zip(&slot.log.buf) {
            *h |= *b;
        }
        Ok(true)
    }

    /// Issues `KVM_CLEAR_DIRTY_LOG` for slot pages `lo..hi`: the range is
    /// widened to 64-page words (as KVM requires), but the bitmap passed
    /// holds only bits inside `lo..hi` that were harvested, which are then
    /// forgotten.
    fn clear(&self, vm: &VmFd, slot: &mut Slot, lo: u64, hi: u64) -> Result<(), KvmError> {
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
                clear_dirty_log(vm, slot.id.0, first_page, num_pages as u32, &buf[..n]).map_err(
                    |e| {
                        KvmError::ioctl(
                            format!(
                                "KVM_CLEAR_DIRTY_LOG (slot {}, pages {first_page}..+{num_pages})",
                                slot.id.0
                            ),
                            e,
                        )
                    },
                )?;
            }
            w += n;
        }
        Ok(())
    }
}

/// Manual-protect mode's [`DirtyLogSource`](ramblock_core::dirty_log::DirtyLogSource); see the module docs.
#[derive(Copy, Clone, Debug)]
pub struct ManualProtectLog<'vm> {
    pub(super) vm: &'vm Vm,
}

impl<'vm> ManualProtectLog<'vm> {
    /// The manual-protect log of `vm`, which must be in
    /// [`DirtyLogMode::ManualProtect`].
    pub fn new(vm: &'vm Vm) -> Result<Self, KvmError> {
        require(
            vm,
            "the manual-protect dirty log",
            DirtyLogMode::ManualProtect,
        )?;
        Ok(ManualProtectLog { vm })
    }
}
