//! [`RamListener`]: code that wants to hear about blocks coming and going.
//!
//! A KVM memslot manager, a vhost-user backend or a display adapter registers
//! a listener with [`crate::list::RamList::add_listener`] and is first told
//! about every block that already exists ("replay"), then about each change.
//!
//! Listeners are called with the list's write lock held, so they see changes
//! in order and never miss one; they must not call back into the list.

use crate::addr::ByteLen;
use crate::bitmap::Storage;
use crate::block::RamBlock;

/// Hears about blocks being added, removed and resized.
pub trait RamListener<M, S: Storage> {
    /// `block` was added (or existed when the listener was registered).
    fn block_added(&self, block: &RamBlock<M, S>) {
        let _ = block;
    }

    /// `block` is being removed; this is the last call about it.
    fn block_removed(&self, block: &RamBlock<M, S>) {
        let _ = block;
    }

    /// `block`'s used length changed from `old` to `new`.
    fn block_resized(&self, block: &RamBlock<M, S>, old: ByteLen, new: ByteLen) {
        let _ = (block, old, new);
    }
}
