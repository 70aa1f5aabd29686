//! Bitmap mode: `KVM_GET_DIRTY_LOG` fetches a slot's bitmap, clears it and
//! re-protects the pages in one call. Nothing to enable: it is every VM's
//! default. The fetch is also what manual-protect mode uses.

use super::{require, ModeKernel};
use crate::error::KvmError;
use crate::memslot::Slot;
use crate::mode::DirtyLogMode;
use crate::vm::Vm;
use kvm_bindings::kvm_dirty_log;
use kvm_ioctls::VmFd;
use ramblock_core::bitmap::words_for;
use std::os::fd::AsRawFd;

/// The raw ioctl nix generates; see [`get_dirty_log`].
#[allow(missing_docs, clippy::missing_safety_doc)]
mod raw {
    use super::*;
    // `#define KVM_GET_DIRTY_LOG _IOW(KVMIO, 0x42, struct kvm_dirty_log)`
    nix::ioctl_write_ptr!(kvm_get_dirty_log, crate::dirty::KVMIO, 0x42, kvm_dirty_log);
}

/// `KVM_GET_DIRTY_LOG` for slot `slot` of `vm` into `bitmap`, unchecked:
/// the raw call, for measuring against. [`Vm::get_dirty_log`] is the
/// checked form.
///
/// # Safety
/// The kernel writes one bit per page of the slot, rounded up to 64 bits,
/// with no idea how long `bitmap` is: slot `slot` (address space
/// `slot >> 16`) of `vm` must have at most `bitmap.len() * 64` pages, and
/// must not be re-created larger while the call runs.
///
/// Safe code cannot make the call that once let the kernel write past an
/// empty slice:
///
/// ```compile_fail
/// # fn f(vm: &kvm_ioctls::VmFd) {
/// let _ = ramblock_kvm::dirty::bitmap::get_dirty_log(vm, 0, &mut []);
/// # }
/// ```
pub unsafe fn get_dirty_log(vm: &VmFd, slot: u32, bitmap: &mut [u64]) -> nix::Result<()> {
    let log = kvm_dirty_log {
        slot,
        padding1: 0,
        __bindgen_anon_1: kvm_bindings::kvm_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr().cast(),
        },
    };
    // SAFETY: `vm` is a KVM VM fd (a `VmFd` is only made by KVM_CREATE_VM),
    // so the request means KVM_GET_DIRTY_LOG; it writes one bit per page of
    // the slot into `bitmap`, which the caller promises is long enough.
    unsafe { raw::kvm_get_dirty_log(vm.as_raw_fd(), &log) }.map(drop)
}

/// `KVM_GET_DIRTY_LOG` for `slot` into `bitmap`, refused with
/// [`KvmError::LogBuffer`] before the kernel sees it unless `bitmap` holds
/// one bit per page of the slot.
///
/// `slot` must come from `vm`'s slot table, whose lengths are the ones KVM
/// has registered (the table is updated only together with the kernel,
/// under its lock, which the caller holds).
pub(crate) fn get_checked(vm: &VmFd, slot: &Slot, bitmap: &mut [u64]) -> Result<(), KvmError> {
    let needed = words_for(slot.pages() as usize);
    if bitmap.len() < needed {
        return Err(KvmError::LogBuffer {
            slot: slot.id.0,
            pages: slot.pages(),
            needed,
            words: bitmap.len(),
        });
    }
    // SAFETY: KVM's slot `slot.id` has `slot.pages()` pages (see above), and
    // `bitmap` holds at least that many bits, checked just now; the caller
    // holds the slot table's lock, so the slot is not re-created meanwhile.
    unsafe { get_dirty_log(vm, slot.id.0, bitmap) }
        .map_err(|e| KvmError::ioctl(format!("KVM_GET_DIRTY_LOG (slot {})", slot.id.0), e))
}

/// Fetches `slot`'s log into its own buffer, sized for it when logging was
/// switched on.
pub(crate) fn fetch(vm: &VmFd, slot: &mut Slot) -> Result<(), KvmError> {
    // Taken out and put back (no allocation) to pass the slot alongside it.
    let mut buf = std::mem::take(&mut slot.log.buf);
    let fetched = get_checked(vm, slot, &mut buf);
    slot.log.buf = buf;
    fetched
}

/// Bitmap mode's kernel side.
#[derive(Debug)]
pub(crate) struct Bitmap;

impl ModeKernel for Bitmap {
    fn mode(&self) -> DirtyLogMode {
        DirtyLogMode::Bitmap
    }

    fn fetch(&self, vm: &VmFd, slot: &mut Slot) -> Result<bool, KvmError> {
        fetch(vm, slot).map(|()| true)
    }
}

/// Bitmap mode's [`DirtyLogSource`](ramblock_core::dirty_log::DirtyLogSource); see the module docs.
#[derive(Copy, Clone, Debug)]
pub struct BitmapLog<'vm> {
    pub(super) vm: &'vm Vm,
}

impl<'vm> BitmapLog<'vm> {
    /// The bitmap log of `vm`, which must be in [`DirtyLogMode::Bitmap`]
    /// (a ring VM has no bitmap, and a manual-protect VM's bitmap is never
    /// re-protected by a fetch).
    pub fn new(vm: &'vm Vm) -> Result<Self, KvmError> {
        require(vm, "the bitmap dirty log", DirtyLogMode::Bitmap)?;
        Ok(BitmapLog { vm })
    }
}
