//! The dirty-log seam: who wrote to guest RAM since the last look.
//!
//! Each block has one [`crate::bitmap::AtomicBitmap`] per [`DirtyClient`],
//! set by the VMM's own writes and by resizes. The hypervisor's log (KVM's
//! bitmap, manual-protect or dirty-ring modes) arrives through a
//! [`DirtyLogSource`], implemented in `ramblock-kvm`. A block's
//! [`crate::block::RamBlock::sync_dirty_log`] merges both into its migration
//! bitmap, so nothing written by either side is missed.

use crate::addr::{ByteLen, PageSize, RamAddr};
use crate::bitmap::MigrationBitmap;
use crate::flags::BlockFlags;
use core::convert::Infallible;
use core::fmt;

/// A consumer of dirty information, with a bitmap of its own per block.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum DirtyClient {
    /// Display emulation (which parts of VRAM to redraw).
    Display = 0,
    /// Code caches (TCG translation invalidation).
    Code = 1,
    /// Live migration.
    Migration = 2,
}

impl DirtyClient {
    /// Every client, in index order.
    pub const ALL: [DirtyClient; 3] = [
        DirtyClient::Display,
        DirtyClient::Code,
        DirtyClient::Migration,
    ];
}

bitflags::bitflags! {
    /// A set of [`DirtyClient`]s.
    #[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
    pub struct DirtyClients: u8 {
        /// [`DirtyClient::Display`].
        const DISPLAY = 1 << 0;
        /// [`DirtyClient::Code`].
        const CODE = 1 << 1;
        /// [`DirtyClient::Migration`].
        const MIGRATION = 1 << 2;
    }
}

impl DirtyClients {
    /// Whether `client` is in the set.
    pub fn has(self, client: DirtyClient) -> bool {
        self.bits() & (1 << client as u8) != 0
    }
}

/// What a dirty-log source needs to know about a block.
#[derive(Copy, Clone, Debug)]
pub struct BlockInfo<'a> {
    /// The block's name.
    pub name: &'a str,
    /// The block's RAM address (unique among live blocks).
    pub offset: RamAddr,
    /// The block's used length.
    pub used_length: ByteLen,
    /// The host page size.
    pub page_size: PageSize,
    /// The block's flags.
    pub flags: BlockFlags,
}

impl BlockInfo<'_> {
    /// The used length in target pages.
    pub fn used_pages(&self) -> usize {
        // A used length that did not fit usize pages could not have been mapped.
        usize::try_from(self.used_length.target_pages().0).unwrap_or(usize::MAX)
    }
}

/// A hypervisor's dirty log.
pub trait DirtyLogSource {
    /// What went wrong in the hypervisor.
    type Error: fmt::Debug + fmt::Display;

    /// Whether harvesting leaves memory writable, so that each harvested
    /// range must be [`DirtyLogSource::clear`]ed before its pages are sent
    /// (KVM's manual-protect mode). The block then tracks harvested chunks in
    /// its [`crate::bitmap::ClearMap`].
    fn needs_clear(&self) -> bool;

    /// ORs the pages of `block` written since the last harvest into `into`
    /// (one bit per target page, bit 0 = the block's first page) and returns
    /// how many bits were newly set.
    fn harvest(
        &mut self,
        block: &BlockInfo<'_>,
        into: &mut MigrationBitmap<&mut [u64]>,
    ) -> Result<u64, Self::Error>;

    /// Re-arms write tracking for `count` target pages of `block` from
    /// `first`, which have been harvested and are about to be sent.
    fn clear(
        &mut self,
        block: &BlockInfo<'_>,
        first: usize,
        count: usize,
    ) -> Result<(), Self::Error>;
}

/// A source with no hypervisor behind it: only the VMM's own writes, marked
/// through the block API, are dirty. Used when there is no KVM.
#[derive(Copy, Clone, Debug, Default)]
pub struct SoftwareOnly;

impl DirtyLogSource for SoftwareOnly {
    type Error = Infallible;

    fn needs_clear(&self) -> bool {
        false
    }

    fn harvest(
        &mut self,
        _: &BlockInfo<'_>,
        _: &mut MigrationBitmap<&mut [u64]>,
    ) -> Result<u64, Infallible> {
        Ok(0)
    }

    fn clear(&mut self, _: &BlockInfo<'_>, _: usize, _: usize) -> Result<(), Infallible> {
        Ok(())
    }
}
