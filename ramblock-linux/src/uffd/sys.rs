//! The kernel's userfaultfd ABI (`linux/userfaultfd.h`): the ioctl argument
//! structs, their opcodes and the 32-byte `uffd_msg`. The `libc` crate does
//! not carry these, so they are written out here; field order and sizes
//! follow the UAPI header exactly.

use rustix::ioctl::{opcode, Opcode};

/// The only API version there is (`UFFD_API`).
pub(crate) const UFFD_API: u64 = 0xAA;

/// The ioctl group of both `/dev/userfaultfd` and userfaultfd descriptors.
const UFFDIO: u8 = 0xAA;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    /// Written by the kernel: the ioctls the range supports.
    pub ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    /// Written by the kernel: bytes copied, or a negative errno.
    pub copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct UffdioZeropage {
    pub range: UffdioRange,
    pub mode: u64,
    /// Written by the kernel: bytes zeroed, or a negative errno.
    pub zeropage: i64,
}

/// `struct uffdio_continue`.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct UffdioContinue {
    pub range: UffdioRange,
    pub mode: u64,
    /// Written by the kernel: bytes mapped, or a negative errno.
    pub mapped: i64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}

/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`: the argument is the new
/// descriptor's `O_*` flags, the result the descriptor.
pub(crate) const USERFAULTFD_IOC_NEW: Opcode = opcode::none(UFFDIO, 0x00);
pub(crate) const UFFDIO_REGISTER: Opcode = opcode::read_write::<UffdioRegister>(UFFDIO, 0x00);
// The header declares UNREGISTER and WAKE `_IOR` although the kernel reads
// the range; the opcode must match the header, not the direction.
pub(crate) const UFFDIO_UNREGISTER: Opcode = opcode::read::<UffdioRange>(UFFDIO, 0x01);
pub(crate) const UFFDIO_WAKE: Opcode = opcode::read::<UffdioRange>(UFFDIO, 0x02);
pub(crate) const UFFDIO_COPY: Opcode = opcode::read_write::<UffdioCopy>(UFFDIO, 0x03);
pub(crate) const UFFDIO_ZEROPAGE: Opcode = opcode::read_write::<UffdioZeropage>(UFFDIO, 0x04);
pub(crate) const UFFDIO_WRITEPROTECT: Opcode =
    opcode::read_write::<UffdioWriteprotect>(UFFDIO, 0x06);
pub(crate) const UFFDIO_CONTINUE: Opcode = opcode::read_write::<UffdioContinue>(UFFDIO, 0x07);
pub(crate) const UFFDIO_API: Opcode = opcode::read_write::<UffdioApi>(UFFDIO, 0x3F);

/// `UFFDIO_COPY_MODE_DONTWAKE`, `UFFDIO_ZEROPAGE_MODE_DONTWAKE` and
/// `UFFDIO_CONTINUE_MODE_DONTWAKE` share this bit.
pub(crate) const MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT_MODE_WP`.
pub(crate) const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`.
pub(crate) const WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;

/// `sizeof(struct uffd_msg)`: a packed struct, read as bytes and decoded
/// field by field rather than through a packed Rust struct.
pub(crate) const MSG_SIZE: usize = 32;
/// Offsets into `uffd_msg`: the event byte, then the `arg` union at 8.
pub(crate) const MSG_EVENT: usize = 0;
pub(crate) const MSG_ARG0: usize = 8;
pub(crate) const MSG_ARG1: usize = 16;

pub(crate) const EVENT_PAGEFAULT: u8 = 0x12;
pub(crate) const EVENT_REMOVE: u8 = 0x15;
pub(crate) const EVENT_UNMAP: u8 = 0x16;

pub(crate) const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
pub(crate) const PAGEFAULT_FLAG_WP: u64 = 1 << 1;
pub(crate) const PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

/// The `u64` at `offset` of a message.
pub(crate) fn msg_u64(msg: &[u8; MSG_SIZE], offset: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&msg[offset..offset + 8]);
    u64::from_ne_bytes(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The opcodes as the C preprocessor computes them on x86-64 and arm64
    /// (both use the generic `_IOC` encoding).
    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn opcodes_match_the_c_header() {
        assert_eq!(USERFAULTFD_IOC_NEW as u64, 0xaa00);
        assert_eq!(UFFDIO_API as u64, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER as u64, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER as u64, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE as u64, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY as u64, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE as u64, 0xc020_aa04);
        assert_eq!(UFFDIO_WRITEPROTECT as u64, 0xc018_aa06);
        assert_eq!(UFFDIO_CONTINUE as u64, 0xc020_aa07);
    }
}
