//! The slot table: which KVM memslot ids are in use, for which guest-physical
//! range and which pages of which block, with each slot's dirty-log buffers.
//!
//! Callers never pick slot ids or check ranges by hand: [`SlotTable::insert`]
//! takes the lowest free id and refuses a range that overlaps another slot.
//! This module makes no system call; [`crate::vm::Vm`] issues the ioctls.

use crate::error::KvmError;
use ramblock_core::addr::RamAddr;
use ramblock_core::bitmap::words_for;

/// A KVM memslot id (address space 0).
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotId(pub u32);

/// Which pages of a block a slot maps.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum BlockRange {
    /// The block's whole used length; the slot follows the block when it is
    /// resized.
    Whole,
    /// `count` pages from page `first`; fixed.
    Pages {
        /// First page of the block.
        first: u64,
        /// Pages.
        count: u64,
    },
}

/// A slot's dirty-log buffers, allocated when logging is switched on so a
/// harvest never allocates.
#[derive(Debug, Default)]
pub(crate) struct SlotLog {
    /// Where `KVM_GET_DIRTY_LOG` writes; scratch for `KVM_CLEAR_DIRTY_LOG`.
    pub buf: Vec<u64>,
    /// Manual protect: bits harvested and not yet cleared in KVM.
    pub harvested: Vec<u64>,
    /// Pages known dirty but not yet merged into the migration bitmap:
    /// drained ring entries, and the log saved when a slot is re-created.
    pub pending: Vec<u64>,
    /// Whether `pending` may have a bit set (skips a scan when clean).
    pub pending_any: bool,
}

impl SlotLog {
    pub(crate) fn sized(pages: u64) -> SlotLog {
        let words = words_for(pages as usize);
        SlotLog {
            buf: vec![0; words],
            harvested: vec![0; words],
            pending: vec![0; words],
            pending_any: false,
        }
    }

    /// Resizes every buffer for `pages`, keeping the bits that still fit.
    pub(crate) fn resize(&mut self, pages: u64) {
        let words = words_for(pages as usize);
        for v in [&mut self.buf, &mut self.harvested, &mut self.pending] {
            v.resize(words, 0);
            if let (Some(last), r) = (v.last_mut(), pages % 64) {
                if r != 0 {
                    *last &= (1u64 << r) - 1;
                }
            }
        }
    }

    /// ORs `bits` (one per slot page) into `pending`.
    pub(crate) fn stash(&mut self, bits: &[u64]) {
        for (p, b) in self.pending.iter_mut().zip(bits) {
            if *b != 0 {
                *p |= *b;
                self.pending_any = true;
            }
        }
    }
}

/// One registered memslot.
#[derive(Debug)]
pub struct Slot {
    /// The KVM slot id.
    pub id: SlotId,
    /// Guest-physical start.
    pub gpa: u64,
    /// Bytes mapped.
    pub len: u64,
    /// Host address of the first byte.
    pub host: u64,
    /// Bytes from `host` to the end of the block's reservation: what the
    /// caller of [`crate::vm::Vm::map_block`] promised stays reserved for
    /// the block, so the most a [`BlockRange::Whole`] slot may grow to.
    pub reserved: u64,
    /// The block's RAM address (its identity among live blocks).
    pub block: RamAddr,
    /// The block's name, for messages.
    pub block_name: String,
    /// The block page the slot starts at.
    pub first_page: u64,
    /// Whether the slot follows the block's used length.
    pub range: BlockRange,
    /// `KVM_MEM_READONLY`.
    pub read_only: bool,
    /// Logging asked for: `KVM_MEM_LOG_DIRTY_PAGES`, except on a
    /// guest_memfd slot, which KVM cannot log (see [`Slot::kernel_logs`]).
    pub logging: bool,
    /// `KVM_MEM_GUEST_MEMFD`: the guest_memfd (raw fd, kept open by the
    /// block's memory) and the offset in it of the slot's first byte.
    pub guest_memfd: Option<(i32, u64)>,
    pub(crate) log: SlotLog,
}

impl Slot {
    /// Pages mapped.
    pub fn pages(&self) -> u64 {
        self.len >> 12
    }

    /// Whether KVM keeps the slot's dirty log. It refuses
    /// `KVM_MEM_LOG_DIRTY_PAGES` with `KVM_MEM_GUEST_MEMFD` (Linux 6.18:
    /// `EINVAL` when the slot is created so, and for the flag added
    /// later), and the guest's writes through a guest_memfd slot reach
    /// its pages without the host's page tables, where no other tracker
    /// could see them. So a logging guest_memfd slot reports every page
    /// dirty at every harvest (its block is sent whole in every pass):
    /// nothing is missed, at the cost of sending it again.
    pub fn kernel_logs(&self) -> bool {
        self.logging && self.guest_memfd.is_none()
    }

    /// A logging slot whose every page counts as dirty at each harvest
    /// (a guest_memfd slot, see [`Slot::kernel_logs`]).
    pub fn always_dirty(&self) -> bool {
        self.logging && self.guest_memfd.is_some()
    }

    /// The KVM memslot flags for the slot's current state.
    pub fn kvm_flags(&self) -> u32 {
        let mut flags = 0;
        if self.kernel_logs() {
            flags |= kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
        }
        if self.read_only {
            flags |= kvm_bindings::KVM_MEM_READONLY;
        }
        if self.guest_memfd.is_some() {
            flags |= kvm_bindings::KVM_MEM_GUEST_MEMFD;
        }
        flags
    }
}

/// The slots of one VM, indexed by id.
#[derive(Debug)]
pub struct SlotTable {
    slots: Vec<Option<Slot>>,
    max: u32,
}

impl SlotTable {
    /// An empty table for a VM with `max` slots.
    pub fn new(max: u32) -> SlotTable {
        SlotTable {
            slots: Vec::new(),
            max,
        }
    }

    /// Checks that `gpa..+len` is aligned and overlaps no slot other than
    /// `except`.
    pub fn check_range(&self, gpa: u64, len: u64, except: Option<SlotId>) -> Result<(), KvmError> {
        let end = gpa.checked_add(len);
        if gpa % 4096 != 0 || len % 4096 != 0 || len == 0 || end.is_none() {
            return Err(KvmError::BadGpa { gpa, len });
        }
        let end = end.unwrap_or(u64::MAX);
        for s in self.iter() {
            if Some(s.id) != except && gpa < s.gpa + s.len && s.gpa < end {
                return Err(KvmError::Overlap {
                    gpa,
                    len,
                    other: s.id.0,
                    other_gpa: s.gpa,
                    other_len: s.len,
                });
            }
        }
        Ok(())
    }

    /// The id the next [`SlotTable::insert`] would use.
    pub fn next_id(&self) -> Result<SlotId, KvmError> {
        let free = self.slots.iter().position(Option::is_none);
        let id = free.unwrap_or(self.slots.len()) as u32;
        if id >= self.max {
            return Err(KvmError::SlotsFull { max: self.max });
        }
        Ok(SlotId(id))
    }

    /// Adds `slot` (whose id came from [`SlotTable::next_id`]) after checking
    /// its range.
    pub fn insert(&mut self, slot: Slot) -> Result<SlotId, KvmError> {
        self.check_range(slot.gpa, slot.len, None)?;
        let id = slot.id;
        let i = id.0 as usize;
        if self.slots.len() <= i {
            self.slots.resize_with(i + 1, || None);
        }
        debug_assert!(self.slots[i].is_none(), "slot id handed out twice");
        self.slots[i] = Some(slot);
        Ok(id)
    }

    /// Removes and returns slot `id`.
    pub fn remove(&mut self, id: SlotId) -> Result<Slot, KvmError> {
        self.slots
            .get_mut(id.0 as usize)
            .and_then(Option::take)
            .ok_or(KvmError::UnknownSlot(id.0))
    }

    /// Slot `id`.
    pub fn get(&self, id: SlotId) -> Option<&Slot> {
        self.slots.get(id.0 as usize)?.as_ref()
    }

    /// Slot `id`, mutably.
    pub fn get_mut(&mut self, id: SlotId) -> Option<&mut Slot> {
        self.slots.get_mut(id.0 as usize)?.as_mut()
    }

    /// Every slot, by id.
    pub fn iter(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter().flatten()
    }

    /// Every slot, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Slot> {
        self.slots.iter_mut().flatten()
    }

    /// The ids of the slots of the block at `block`.
    pub fn ids_of_block(&self, block: RamAddr) -> impl Iterator<Item = SlotId> + '_ {
        self.iter().filter(move |s| s.block == block).map(|s| s.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(t: &SlotTable, gpa: u64, len: u64) -> Slot {
        Slot {
            id: t.next_id().unwrap(),
            gpa,
            len,
            host: 0,
            reserved: len,
            block: RamAddr(0),
            block_name: "b".into(),
            first_page: 0,
            range: BlockRange::Whole,
            read_only: false,
            logging: false,
            guest_memfd: None,
            log: SlotLog::default(),
        }
    }

    #[test]
    fn ids_are_reused_lowest_first_and_ranges_never_overlap() {
        let mut t = SlotTable::new(3);
        let a = t.insert(slot(&t, 0, 0x10000)).unwrap();
        let b = t.insert(slot(&t, 0x10000, 0x1000)).unwrap();
        assert_eq!((a, b), (SlotId(0), SlotId(1)));
        for (gpa, len) in [(0xf000, 0x2000), (0x10000, 0x1000), (0, 0x100000)] {
            assert!(matches!(
                t.insert(slot(&t, gpa, len)),
                Err(KvmError::Overlap { .. })
            ));
        }
        assert!(matches!(
            t.check_range(0x123, 0x1000, None),
            Err(KvmError::BadGpa { .. })
        ));
        assert!(matches!(
            t.check_range(u64::MAX - 0xfff, 0x2000, None),
            Err(KvmError::BadGpa { .. })
        ));
        t.remove(a).unwrap();
        assert!(matches!(t.remove(a), Err(KvmError::UnknownSlot(0))));
        assert_eq!(t.insert(slot(&t, 0, 0x1000)).unwrap(), SlotId(0));
        t.insert(slot(&t, 0x20000, 0x1000)).unwrap();
        assert!(matches!(t.next_id(), Err(KvmError::SlotsFull { max: 3 })));
        // A slot may grow over its own range.
        t.check_range(0x10000, 0x8000, Some(b)).unwrap();
    }

    #[test]
    fn resizing_a_log_keeps_only_bits_that_fit() {
        let mut log = SlotLog::sized(130);
        log.stash(&[!0, !0, !0]);
        log.resize(70);
        assert_eq!(log.pending, vec![!0, 0x3f]);
        log.resize(200);
        assert_eq!(log.pending, vec![!0, 0x3f, 0, 0]);
    }
}
