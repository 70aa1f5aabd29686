//! The three KVM dirty-log modes behind the core's
//! [`DirtyLogSource`]: what `harvest` and `clear` do in each.
//!
//! - [`BitmapLog`]: `KVM_GET_DIRTY_LOG` per slot into the slot's reused
//!   buffer (fetch, clear and re-protect in one call), merged into the
//!   migration bitmap with the newly-dirty count.
//! - [`ManualProtectLog`]: the same fetch, which in this mode neither clears
//!   nor re-protects; the bits fetched are remembered per slot, the core's
//!   clear map records the harvested chunks, and [`DirtyLogSource::clear`]
//!   re-protects exactly those remembered bits of a chunk with
//!   `KVM_CLEAR_DIRTY_LOG` just before its first page is sent.
//! - [`RingLog`]: drains every vCPU's dirty ring into per-slot pending bits
//!   (also done by [`crate::vcpu::Vcpu::run`] when a ring fills), resets the
//!   rings, and merges the block's pending bits.
//!
//! [`KvmDirtyLog`] is whichever of the three the VM was created with. In
//! every mode the slot's pending bits (pages saved when a slot was
//! re-created) are merged too. None of them allocates.

use crate::error::KvmError;
use crate::mode::DirtyLogMode;
use crate::vm::Vm;
use ramblock_core::bitmap::MigrationBitmap;
use ramblock_core::dirty_log::{BlockInfo, DirtyLogSource};

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

/// Bitmap mode; see the module docs.
#[derive(Copy, Clone, Debug)]
pub struct BitmapLog<'vm> {
    vm: &'vm Vm,
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

impl DirtyLogSource for BitmapLog<'_> {
    type Error = KvmError;

    fn needs_clear(&self) -> bool {
        false
    }

    fn harvest(
        &mut self,
        block: &BlockInfo<'_>,
        into: &mut MigrationBitmap<&mut [u64]>,
    ) -> Result<u64, KvmError> {
        self.vm.harvest_slots(block, into)
    }

    fn clear(&mut self, _: &BlockInfo<'_>, _: usize, _: usize) -> Result<(), KvmError> {
        Ok(())
    }
}

/// Manual-protect mode; see the module docs.
#[derive(Copy, Clone, Debug)]
pub struct ManualProtectLog<'vm> {
    vm: &'vm Vm,
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

impl DirtyLogSource for ManualProtectLog<'_> {
    type Error = KvmError;

    fn needs_clear(&self) -> bool {
        true
    }

    fn harvest(
        &mut self,
        block: &BlockInfo<'_>,
        into: &mut MigrationBitmap<&mut [u64]>,
    ) -> Result<u64, KvmError> {
        self.vm.harvest_slots(block, into)
    }

    fn clear(&mut self, block: &BlockInfo<'_>, first: usize, count: usize) -> Result<(), KvmError> {
        self.vm.clear_harvested(block, first, count)
    }
}

/// Dirty-ring mode; see the module docs.
#[derive(Copy, Clone, Debug)]
pub struct RingLog<'vm> {
    vm: &'vm Vm,
}

impl<'vm> RingLog<'vm> {
    /// The ring log of `vm`, which must be in [`DirtyLogMode::Ring`].
    pub fn new(vm: &'vm Vm) -> Result<Self, KvmError> {
        require(vm, "the dirty-ring log", DirtyLogMode::Ring { entries: 0 })?;
        Ok(RingLog { vm })
    }
}

impl DirtyLogSource for RingLog<'_> {
    type Error = KvmError;

    fn needs_clear(&self) -> bool {
        false
    }

    fn harvest(
        &mut self,
        block: &BlockInfo<'_>,
        into: &mut MigrationBitmap<&mut [u64]>,
    ) -> Result<u64, KvmError> {
        self.vm.collect_dirty_rings()?;
        self.vm.harvest_slots(block, into)
    }

    fn clear(&mut self, _: &BlockInfo<'_>, _: usize, _: usize) -> Result<(), KvmError> {
        Ok(())
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

impl DirtyLogSource for KvmDirtyLog<'_> {
    type Error = KvmError;

    fn needs_clear(&self) -> bool {
        match self {
            KvmDirtyLog::Bitmap(l) => l.needs_clear(),
            KvmDirtyLog::ManualProtect(l) => l.needs_clear(),
            KvmDirtyLog::Ring(l) => l.needs_clear(),
        }
    }

    fn harvest(
        &mut self,
        block: &BlockInfo<'_>,
        into: &mut MigrationBitmap<&mut [u64]>,
    ) -> Result<u64, KvmError> {
        match self {
            KvmDirtyLog::Bitmap(l) => l.harvest(block, into),
            KvmDirtyLog::ManualProtect(l) => l.harvest(block, into),
            KvmDirtyLog::Ring(l) => l.harvest(block, into),
        }
    }

    fn clear(&mut self, block: &BlockInfo<'_>, first: usize, count: usize) -> Result<(), KvmError> {
        match self {
            KvmDirtyLog::Bitmap(l) => l.clear(block, first, count),
            KvmDirtyLog::ManualProtect(l) => l.clear(block, first, count),
            KvmDirtyLog::Ring(l) => l.clear(block, first, count),
        }
    }
}
