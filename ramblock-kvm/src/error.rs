//! [`KvmError`]: everything that can go wrong binding blocks to KVM and
//! harvesting their dirty pages.

use crate::mode::DirtyLogMode;
use nix::errno::Errno;

/// A failure in ramblock-kvm. Each message says what was asked, what was
/// found and what to do.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// `/dev/kvm` could not be opened or the VM not created.
    #[error("cannot {what}: {errno}; check that /dev/kvm exists and is readable and writable")]
    Open {
        /// What was attempted.
        what: &'static str,
        /// The kernel's answer.
        errno: Errno,
    },
    /// A KVM ioctl failed.
    #[error("{what} failed: {errno}")]
    Ioctl {
        /// Which call, with its arguments.
        what: String,
        /// The kernel's answer.
        errno: Errno,
    },
    /// The requested dirty-log mode is not offered by this host.
    #[error("dirty-log mode {mode} was asked for but this host's KVM does not offer it ({caps}); use `auto` or another mode")]
    ModeUnsupported {
        /// The mode asked for.
        mode: DirtyLogMode,
        /// What the host offers.
        caps: String,
    },
    /// Two dirty-log modes were asked for at once.
    #[error("dirty-log modes {first} and {second} were both asked for, but {why}; ask for one")]
    ExclusiveModes {
        /// One mode asked for.
        first: DirtyLogMode,
        /// The other.
        second: DirtyLogMode,
        /// Why they cannot be combined.
        why: &'static str,
    },
    /// A dirty-log mode string could not be parsed.
    #[error("unknown dirty-log mode {0:?}; expected auto, bitmap, manual, ring or ring:<entries>")]
    ModeSyntax(String),
    /// The dirty-ring size is unusable.
    #[error("dirty ring of {entries} entries was asked for; {why}")]
    RingSize {
        /// Entries asked for.
        entries: u32,
        /// What is wrong and the allowed range.
        why: String,
    },
    /// The operation needs a different dirty-log mode than the VM's.
    #[error("{what} needs dirty-log mode {needed}, but this VM logs with {active}; create the VM with that mode")]
    WrongMode {
        /// The operation.
        what: &'static str,
        /// The mode it needs.
        needed: DirtyLogMode,
        /// The VM's mode.
        active: DirtyLogMode,
    },
    /// The guest-physical range overlaps an existing slot.
    #[error("guest-physical range {gpa:#x}..+{len:#x} overlaps slot {other} at {other_gpa:#x}..+{other_len:#x}; pick a free range or remove that slot first")]
    Overlap {
        /// Start asked for.
        gpa: u64,
        /// Length asked for.
        len: u64,
        /// The slot it collides with.
        other: u32,
        /// That slot's start.
        other_gpa: u64,
        /// That slot's length.
        other_len: u64,
    },
    /// All memslots are in use.
    #[error("all {max} KVM memslots are in use; remove one first")]
    SlotsFull {
        /// Slots this VM offers.
        max: u32,
    },
    /// No slot with this id.
    #[error("no memslot {0} exists; it was never added or has been removed")]
    UnknownSlot(u32),
    /// A dirty-log buffer is too short for its slot; refused before the
    /// kernel, which would write one bit per page of the slot, saw it.
    #[error("slot {slot} has {pages} pages, so its dirty log needs {needed} 64-bit words, but the buffer has {words}; size it with ramblock_core::bitmap::words_for")]
    LogBuffer {
        /// The slot.
        slot: u32,
        /// Pages in the slot.
        pages: u64,
        /// Words the log needs.
        needed: usize,
        /// Words the buffer has.
        words: usize,
    },
    /// A block passed as resized is not the memory its slots map.
    #[error("slot {slot} maps block {block:?} at host {host:#x} with {reserved:#x} bytes reserved, but the block passed has its memory at {found_host:#x} with {found_len:#x} bytes used; pass the block that was mapped")]
    ForeignBlock {
        /// The slot.
        slot: u32,
        /// The mapped block's name.
        block: String,
        /// Where the slot's memory starts.
        host: u64,
        /// Bytes reserved there, as vouched for when it was mapped.
        reserved: u64,
        /// Where the block passed has its memory.
        found_host: u64,
        /// The block's used length.
        found_len: u64,
    },
    /// The page range is not inside the block's used length.
    #[error(
        "pages {first}..+{count} of block {block:?} were asked for, but it has {used} used pages"
    )]
    Range {
        /// The block's name.
        block: String,
        /// First page asked for.
        first: u64,
        /// Pages asked for.
        count: u64,
        /// Pages the block uses.
        used: u64,
    },
    /// A guest-physical address is not 4 KiB aligned or the range wraps.
    #[error("guest-physical range {gpa:#x}..+{len:#x} is not 4 KiB aligned or wraps; align it")]
    BadGpa {
        /// Start asked for.
        gpa: u64,
        /// Length asked for.
        len: u64,
    },
    /// The host cannot make read-only slots.
    #[error("block {0:?} is read-only but this host's KVM lacks KVM_CAP_READONLY_MEM; map it writable or not at all")]
    ReadOnlyUnsupported(String),
    /// Merging into the migration bitmap failed: the block and its slot
    /// disagree about the block's size.
    #[error("slot {slot} covers block pages {first}..+{count}, outside block {block:?}'s bitmap of {len} pages")]
    Bitmap {
        /// The slot.
        slot: u32,
        /// The block's name.
        block: String,
        /// First block page of the slot.
        first: u64,
        /// Pages in the slot.
        count: u64,
        /// Pages in the bitmap.
        len: u64,
    },
    /// guest_memfd blocks need a capability this host's KVM lacks.
    #[error("guest_memfd blocks need {capability}, which this host's KVM does not offer; it comes with {kernel}: run on a host kernel that has it, or use a memfd backing")]
    GuestMemfdUnsupported {
        /// The missing capability.
        capability: &'static str,
        /// The Linux release that brings it.
        kernel: &'static str,
    },
    /// A guest_memfd block's memory is not the VM's guest_memfd mapping.
    #[error("block {block:?} is not a guest_memfd block of this VM: {why}")]
    NotGuestMemfd {
        /// The block's name.
        block: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Reading or writing one part of a vCPU's state failed.
    #[error("vCPU {vcpu}: {ioctl} for its {part} failed: {errno}{hint}")]
    VcpuPart {
        /// The vCPU.
        vcpu: u64,
        /// The part of [`crate::vcpu_state::VcpuState`].
        part: crate::vcpu_state::VcpuPart,
        /// The ioctl.
        ioctl: &'static str,
        /// What the kernel said.
        errno: Errno,
        /// What to do, if there is something to say (starts with "; ").
        hint: &'static str,
    },
    /// KVM refused to read or write one MSR of a vCPU's state.
    #[error("vCPU {vcpu}: {ioctl} refused MSR {index:#x} (value {data:#x}); {hint}")]
    Msr {
        /// The vCPU.
        vcpu: u64,
        /// `KVM_SET_MSRS` or `KVM_GET_MSRS`.
        ioctl: &'static str,
        /// The MSR.
        index: u32,
        /// The value written (0 for a read).
        data: u64,
        /// What to do.
        hint: &'static str,
    },
    /// A saved vCPU state does not fit the vCPU it is restored into.
    #[error("vCPU {vcpu}: its saved {part} does not fit this vCPU: {why}")]
    VcpuMismatch {
        /// The vCPU.
        vcpu: u64,
        /// The part.
        part: crate::vcpu_state::VcpuPart,
        /// What differs, and what to do.
        why: String,
    },
    /// The guest stopped in a way the caller did not expect.
    #[error("vCPU {vcpu}: {what}")]
    Guest {
        /// The vCPU.
        vcpu: u64,
        /// What happened.
        what: String,
    },
}

impl KvmError {
    /// The errno behind the error, if it came from the kernel.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            KvmError::Open { errno, .. }
            | KvmError::Ioctl { errno, .. }
            | KvmError::VcpuPart { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    pub(crate) fn ioctl(what: impl Into<String>, errno: Errno) -> KvmError {
        KvmError::Ioctl {
            what: what.into(),
            errno,
        }
    }

    pub(crate) fn from_kvm(what: impl Into<String>, e: kvm_ioctls::Error) -> KvmError {
        KvmError::ioctl(what, Errno::from_raw(e.errno()))
    }
}
