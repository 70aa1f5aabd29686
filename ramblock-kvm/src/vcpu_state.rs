//! [`VcpuState`]: everything a paused x86-64 vCPU hands to its
//! destination (migration, post-copy switch-over, snapshots), and its
//! versioned wire encoding.
//!
//! The state is what KVM exposes per vCPU, one *part* per ioctl pair:
//!
//! | part | ioctl | what |
//! |------|-------|------|
//! | [`VcpuPart::Regs`] | `KVM_GET/SET_REGS` | general registers, `rip`, `rflags` |
//! | [`VcpuPart::Sregs`] | `KVM_GET/SET_SREGS` | segments, GDT/IDT, control registers, EFER, APIC base, pending interrupt |
//! | [`VcpuPart::Fpu`] | `KVM_GET/SET_FPU` | x87 and SSE, only on hosts without `KVM_CAP_XSAVE` |
//! | [`VcpuPart::Xsave`] | `KVM_GET_XSAVE2`/`KVM_SET_XSAVE` | the XSAVE area: x87, SSE, AVX, ... (size from `KVM_CAP_XSAVE2`) |
//! | [`VcpuPart::Xcrs`] | `KVM_GET/SET_XCRS` | XCR0 |
//! | [`VcpuPart::Msrs`] | `KVM_GET/SET_MSRS` | every MSR `KVM_GET_MSR_INDEX_LIST` lists (includes `IA32_TSC`) |
//! | [`VcpuPart::Lapic`] | `KVM_GET/SET_LAPIC` | the local APIC's register page (VMs with an in-kernel irqchip) |
//! | [`VcpuPart::Events`] | `KVM_GET/SET_VCPU_EVENTS` | pending exception, interrupt, NMI, SMI, interrupt shadow |
//! | [`VcpuPart::MpState`] | `KVM_GET/SET_MP_STATE` | runnable, halted, waiting for SIPI, ... |
//! | [`VcpuPart::DebugRegs`] | `KVM_GET/SET_DEBUGREGS` | DR0-3, DR6, DR7 |
//! | [`VcpuPart::TscKhz`] | `KVM_GET/SET_TSC_KHZ` | the guest's TSC frequency |
//!
//! Only regs and sregs are required; a part the host does not offer is
//! absent. The guest's TSC travels as the `IA32_TSC` MSR: restoring it
//! makes KVM set the destination's TSC offset so the guest's TSC continues
//! from the saved value (it does not jump by the downtime).
//! [`crate::vcpu::Vcpu::save`] and [`crate::vcpu::Vcpu::restore`] say in
//! which order the parts are read and written, and why.
//!
//! # Encoding (version 2)
//!
//! The blob crosses the network and sits in files, so
//! [`VcpuState::from_bytes`] trusts nothing. All little-endian:
//!
//! | bytes | field |
//! |-------|-------|
//! | 8     | magic `RBLKVCPU` |
//! | 4     | version (2) |
//! | 4     | part count `n`, 2..=[`MAX_PARTS`] |
//! | 8 `n` | part table: tag (u32, [`VcpuPart`]'s number) and body length (u32) per part |
//! | ...   | the bodies, in table order |
//! | 8     | FNV-1a 64 of everything before it |
//!
//! Bodies (`u8`/`u16`/`u32`/`u64` little-endian, no padding):
//!
//! - regs (1), 144 bytes: rax rbx rcx rdx rsi rdi rsp rbp r8-r15 rip rflags;
//! - sregs (2), 292 bytes: cs ds es fs gs ss tr ldt (base 8, limit 4,
//!   selector 2, then type present dpl db s l g avl unusable, one byte
//!   each), gdt and idt (base 8, limit 2), cr0 cr2 cr3 cr4 cr8 efer
//!   apic_base, 4 interrupt-bitmap words;
//! - fpu (3), 411 bytes: 8 x87 registers (16 each), fcw, fsw, ftwx (1),
//!   last_opcode, last_ip, last_dp, 16 xmm registers (16 each), mxcsr;
//! - xsave (4): the kernel's XSAVE buffer as is, a multiple of 4 bytes,
//!   4096..=[`MAX_XSAVE_LEN`];
//! - xcrs (5): count (u32, at most 16), flags (u32), then per XCR its
//!   number (u32) and value (u64);
//! - msrs (6): per MSR its index (u32) and value (u64), at most
//!   [`MAX_MSRS`];
//! - lapic (7), 1024 bytes: the APIC register page as KVM gives it;
//! - events (8), 37 bytes: exception (injected nr has_error_code pending,
//!   one byte each, error_code u32), interrupt (injected nr soft shadow),
//!   nmi (injected pending masked), sipi_vector (u32), flags (u32), smi
//!   (smm pending smm_inside_nmi latched_init), triple_fault pending (1),
//!   exception_has_payload (1), exception_payload (u64);
//! - mp_state (9), 4 bytes;
//! - debugregs (10), 56 bytes: db0-3, dr6, dr7, flags (u64 each);
//! - tsc_khz (11), 4 bytes.
//!
//! A blob is refused with its own [`VcpuStateError`] when it is short, has
//! another magic or version, too many parts, an unknown, repeated or
//! missing part, a part longer than its bound or not of its size, a total
//! length that does not match the table, a checksum that does not match,
//! or a field out of range. Every length is bounded before anything is
//! allocated, so the largest blob accepted is about 80 KiB.
//!
//! Version 1 (regs and sregs only, written before this format) is still
//! read: magic, version 1, body length 436, the regs and sregs bodies
//! above, and the checksum.

use kvm_bindings::{
    kvm_debugregs, kvm_dtable, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_segment,
    kvm_sregs, kvm_vcpu_events, kvm_xcr, kvm_xcrs,
};

/// The first eight bytes of every encoded [`VcpuState`].
pub const MAGIC: [u8; 8] = *b"RBLKVCPU";
/// The encoding [`VcpuState::to_bytes`] writes.
pub const VERSION: u32 = 2;
/// The first encoding (regs and sregs only), still read.
pub const VERSION_1: u32 = 1;
/// Bytes of a version-1 body.
pub const BODY_LEN_V1: usize = REGS_LEN + SREGS_LEN;
/// Bytes of a whole version-1 blob.
pub const ENCODED_LEN_V1: usize = HEADER_LEN + BODY_LEN_V1 + CHECKSUM_LEN;
/// Most parts a blob may have (one of each kind).
pub const MAX_PARTS: u32 = 11;
/// Largest XSAVE area accepted: KVM's largest today (with AMX tiles) is
/// about 11 KiB.
pub const MAX_XSAVE_LEN: usize = 64 << 10;
/// Smallest XSAVE area: the kernel's `struct kvm_xsave`.
pub const MIN_XSAVE_LEN: usize = 4096;
/// Most MSRs accepted (KVM lists a few hundred at most).
pub const MAX_MSRS: usize = 1024;

const HEADER_LEN: usize = 16;
const CHECKSUM_LEN: usize = 8;
const TABLE_ENTRY_LEN: usize = 8;
const REGS_LEN: usize = 18 * 8;
const SEGMENT_LEN: usize = 8 + 4 + 2 + 9;
const DTABLE_LEN: usize = 8 + 2;
const SREGS_LEN: usize = 8 * SEGMENT_LEN + 2 * DTABLE_LEN + 11 * 8;
const FPU_LEN: usize = 8 * 16 + 2 + 2 + 1 + 2 + 8 + 8 + 16 * 16 + 4;
const XCR_LEN: usize = 4 + 8;
const MAX_XCRS: usize = kvm_bindings::KVM_MAX_XCRS as usize;
const MSR_LEN: usize = 4 + 8;
const LAPIC_LEN: usize = 1024;
const EVENTS_LEN: usize = 4 + 4 + 4 + 3 + 4 + 4 + 4 + 1 + 1 + 8;
const DEBUGREGS_LEN: usize = 7 * 8;
/// Offset of xmm0 in the legacy region of an XSAVE (or FXSAVE) area.
const XSAVE_XMM0: usize = 160;

/// One part of a [`VcpuState`]: what it holds and its tag in the encoding.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VcpuPart {
    /// General registers.
    Regs = 1,
    /// Segment, descriptor-table and control registers.
    Sregs = 2,
    /// x87 and SSE (hosts without XSAVE).
    Fpu = 3,
    /// The XSAVE area.
    Xsave = 4,
    /// Extended control registers.
    Xcrs = 5,
    /// Model-specific registers.
    Msrs = 6,
    /// The local APIC.
    Lapic = 7,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    Events = 8,
    /// The multiprocessing state.
    MpState = 9,
    /// Debug registers.
    DebugRegs = 10,
    /// The TSC frequency.
    TscKhz = 11,
}

impl VcpuPart {
    /// Every part, in tag order.
    pub const ALL: [VcpuPart; 11] = [
        VcpuPart::Regs,
        VcpuPart::Sregs,
        VcpuPart::Fpu,
        VcpuPart::Xsave,
        VcpuPart::Xcrs,
        VcpuPart::Msrs,
        VcpuPart::Lapic,
        VcpuPart::Events,
        VcpuPart::MpState,
        VcpuPart::DebugRegs,
        VcpuPart::TscKhz,
    ];

    /// The part with tag `tag`.
    pub fn from_tag(tag: u32) -> Option<VcpuPart> {
        VcpuPart::ALL.into_iter().find(|p| *p as u32 == tag)
    }

    /// The name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            VcpuPart::Regs => "regs",
            VcpuPart::Sregs => "sregs",
            VcpuPart::Fpu => "fpu",
            VcpuPart::Xsave => "xsave",
            VcpuPart::Xcrs => "xcrs",
            VcpuPart::Msrs => "msrs",
            VcpuPart::Lapic => "lapic",
            VcpuPart::Events => "vcpu events",
            VcpuPart::MpState => "mp state",
            VcpuPart::DebugRegs => "debug registers",
            VcpuPart::TscKhz => "tsc khz",
        }
    }

    /// The largest body the decoder accepts for this part.
    pub fn max_len(self) -> usize {
        match self {
            VcpuPart::Regs => REGS_LEN,
            VcpuPart::Sregs => SREGS_LEN,
            VcpuPart::Fpu => FPU_LEN,
            VcpuPart::Xsave => MAX_XSAVE_LEN,
            VcpuPart::Xcrs => 8 + MAX_XCRS * XCR_LEN,
            VcpuPart::Msrs => MAX_MSRS * MSR_LEN,
            VcpuPart::Lapic => LAPIC_LEN,
            VcpuPart::Events => EVENTS_LEN,
            VcpuPart::MpState | VcpuPart::TscKhz => 4,
            VcpuPart::DebugRegs => DEBUGREGS_LEN,
        }
    }
}

impl std::fmt::Display for VcpuPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One model-specific register.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Msr {
    /// Its index (`ecx` of `rdmsr`).
    pub index: u32,
    /// Its value.
    pub data: u64,
}

/// A vCPU's state (see the module docs for what it covers).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VcpuState {
    /// General registers, `rip` and `rflags` (`KVM_GET_REGS`).
    pub regs: kvm_regs,
    /// Segments, tables, control registers (`KVM_GET_SREGS`).
    pub sregs: kvm_sregs,
    /// x87 and SSE state, on hosts without XSAVE (`KVM_GET_FPU`).
    pub fpu: Option<kvm_fpu>,
    /// The XSAVE area, as `KVM_GET_XSAVE2` wrote it.
    pub xsave: Option<Vec<u8>>,
    /// Extended control registers (`KVM_GET_XCRS`).
    pub xcrs: Option<kvm_xcrs>,
    /// The MSRs KVM lists as saveable that could be read, in list order.
    pub msrs: Vec<Msr>,
    /// The local APIC, for VMs with an in-kernel one (`KVM_GET_LAPIC`).
    pub lapic: Option<kvm_lapic_state>,
    /// Pending events (`KVM_GET_VCPU_EVENTS`).
    pub events: Option<kvm_vcpu_events>,
    /// The multiprocessing state (`KVM_GET_MP_STATE`).
    pub mp_state: Option<kvm_mp_state>,
    /// Debug registers (`KVM_GET_DEBUGREGS`).
    pub debugregs: Option<kvm_debugregs>,
    /// The guest's TSC frequency in kHz (`KVM_GET_TSC_KHZ`).
    pub tsc_khz: Option<u32>,
}

/// Why a blob is not a [`VcpuState`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VcpuStateError {
    /// Shorter than a header.
    #[error("vCPU state blob is {len} bytes, shorter than its {HEADER_LEN}-byte header; it was cut short, resend it")]
    Truncated {
        /// Bytes received.
        len: usize,
    },
    /// Does not start with [`MAGIC`].
    #[error("vCPU state blob starts with {found:02x?}, not the magic {MAGIC:02x?}; the peer sent something else")]
    Magic {
        /// The first eight bytes.
        found: [u8; 8],
    },
    /// A version this build does not read.
    #[error("vCPU state blob is version {found}, this build reads versions {VERSION_1} and {VERSION}; run the same ramblock on both ends")]
    Version {
        /// The version in the blob.
        found: u32,
    },
    /// A version-1 blob's body length or the blob's length is wrong.
    #[error("vCPU state blob is {len} bytes with a body length of {body_len}; version 1 is exactly {ENCODED_LEN_V1} bytes with a {BODY_LEN_V1}-byte body; it was cut short or padded, resend it")]
    Length {
        /// Bytes received.
        len: usize,
        /// Body length the header declares.
        body_len: u32,
    },
    /// The part count is zero or above [`MAX_PARTS`].
    #[error("vCPU state blob declares {count} parts; a blob has 2..={MAX_PARTS}; the sender's state is corrupt")]
    PartCount {
        /// The count in the header.
        count: u32,
    },
    /// The blob ends inside its part table.
    #[error("vCPU state blob is {len} bytes, but its table of {count} parts needs {needed}; it was cut short, resend it")]
    TableTruncated {
        /// Bytes received.
        len: usize,
        /// Parts declared.
        count: u32,
        /// Bytes up to the table's end.
        needed: usize,
    },
    /// A part tag this build does not know.
    #[error("vCPU state blob has a part with tag {tag}, which this build does not know (1..={MAX_PARTS}); run the same ramblock on both ends")]
    UnknownPart {
        /// The tag.
        tag: u32,
    },
    /// A part appears twice.
    #[error("vCPU state blob has its {part} part twice; the sender's state is corrupt")]
    DuplicatePart {
        /// The part.
        part: VcpuPart,
    },
    /// A required part is absent.
    #[error("vCPU state blob has no {part} part, which every state needs; the sender's state is corrupt")]
    MissingPart {
        /// The part.
        part: VcpuPart,
    },
    /// A part's declared length exceeds its bound.
    #[error("vCPU state blob declares a {part} part of {len} bytes, above its maximum {max}; the sender's state is corrupt")]
    PartTooLong {
        /// The part.
        part: VcpuPart,
        /// Its declared length.
        len: u32,
        /// The bound ([`VcpuPart::max_len`]).
        max: usize,
    },
    /// A part's length is not one its contents can have.
    #[error("vCPU state blob's {part} part is {len} bytes, but {expected}; the sender's state is corrupt")]
    PartLength {
        /// The part.
        part: VcpuPart,
        /// Its length.
        len: usize,
        /// What its length must be.
        expected: &'static str,
    },
    /// The blob's length does not match what its table declares.
    #[error("vCPU state blob is {len} bytes, but its header and part table add up to {expected}; it was cut short or padded, resend it")]
    TotalLength {
        /// Bytes received.
        len: usize,
        /// Bytes the table declares, checksum included.
        expected: usize,
    },
    /// The checksum does not match the contents.
    #[error("vCPU state blob checksum is {stored:#018x} but its contents hash to {computed:#018x}; it was corrupted in transit, resend it")]
    Checksum {
        /// The checksum in the blob.
        stored: u64,
        /// The checksum of what arrived.
        computed: u64,
    },
    /// A field holds a value KVM cannot take.
    #[error("vCPU state field {field} is {value}, above its maximum {max}; the sender's state is corrupt")]
    Field {
        /// Which field (`"cs.dpl"`, `"xcrs.count"`, ...).
        field: String,
        /// The value found.
        value: u64,
        /// The largest valid value.
        max: u64,
    },
}

/// FNV-1a, 64 bits: enough to catch corruption; not a defence against a
/// peer that forges blobs (which could forge any state anyway).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn segments(s: &kvm_sregs) -> [(&'static str, &kvm_segment); 8] {
    [
        ("cs", &s.cs),
        ("ds", &s.ds),
        ("es", &s.es),
        ("fs", &s.fs),
        ("gs", &s.gs),
        ("ss", &s.ss),
        ("tr", &s.tr),
        ("ldt", &s.ldt),
    ]
}

fn regs_words(r: &kvm_regs) -> [u64; 18] {
    [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip, r.rflags,
    ]
}

/// A segment's one-byte fields, in wire order, with their largest values.
fn segment_bytes(s: &kvm_segment) -> [(&'static str, u8, u8); 9] {
    [
        ("type", s.type_, 15),
        ("present", s.present, 1),
        ("dpl", s.dpl, 3),
        ("db", s.db, 1),
        ("s", s.s, 1),
        ("l", s.l, 1),
        ("g", s.g, 1),
        ("avl", s.avl, 1),
        ("unusable", s.unusable, 1),
    ]
}

/// Appends little-endian integers.
struct Writer(Vec<u8>);

impl Writer {
    fn put(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.put(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }
}

fn put_regs(w: &mut Writer, r: &kvm_regs) {
    for v in regs_words(r) {
        w.u64(v);
    }
}

fn put_sregs(w: &mut Writer, s: &kvm_sregs) {
    for (_, seg) in segments(s) {
        w.u64(seg.base);
        w.u32(seg.limit);
        w.u16(seg.selector);
        for (_, v, _) in segment_bytes(seg) {
            w.u8(v);
        }
    }
    for t in [&s.gdt, &s.idt] {
        w.u64(t.base);
        w.u16(t.limit);
    }
    let words = [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base];
    for v in words.iter().chain(&s.interrupt_bitmap) {
        w.u64(*v);
    }
}

fn put_fpu(w: &mut Writer, f: &kvm_fpu) {
    for r in &f.fpr {
        w.put(r);
    }
    w.u16(f.fcw);
    w.u16(f.fsw);
    w.u8(f.ftwx);
    w.u16(f.last_opcode);
    w.u64(f.last_ip);
    w.u64(f.last_dp);
    for r in &f.xmm {
        w.put(r);
    }
    w.u32(f.mxcsr);
}

fn put_xcrs(w: &mut Writer, x: &kvm_xcrs) {
    let n = (x.nr_xcrs as usize).min(MAX_XCRS);
    w.u32(n as u32);
    w.u32(x.flags);
    for xcr in &x.xcrs[..n] {
        w.u32(xcr.xcr);
        w.u64(xcr.value);
    }
}

fn put_events(w: &mut Writer, e: &kvm_vcpu_events) {
    let x = &e.exception;
    for v in [x.injected, x.nr, x.has_error_code, x.pending] {
        w.u8(v);
    }
    w.u32(x.error_code);
    let i = &e.interrupt;
    for v in [i.injected, i.nr, i.soft, i.shadow] {
        w.u8(v);
    }
    for v in [e.nmi.injected, e.nmi.pending, e.nmi.masked] {
        w.u8(v);
    }
    w.u32(e.sipi_vector);
    w.u32(e.flags);
    let s = &e.smi;
    for v in [s.smm, s.pending, s.smm_inside_nmi, s.latched_init] {
        w.u8(v);
    }
    w.u8(e.triple_fault.pending);
    w.u8(e.exception_has_payload);
    w.u64(e.exception_payload);
}

fn put_debugregs(w: &mut Writer, d: &kvm_debugregs) {
    for v in d.db.iter().chain(&[d.dr6, d.dr7, d.flags]) {
        w.u64(*v);
    }
}

impl VcpuState {
    /// The parts this state holds with their encoded bodies, in tag order.
    fn bodies(&self) -> Vec<(VcpuPart, Vec<u8>)> {
        let mut out = Vec::new();
        let mut part = |p: VcpuPart, f: &dyn Fn(&mut Writer)| {
            let mut w = Writer(Vec::new());
            f(&mut w);
            out.push((p, w.0));
        };
        part(VcpuPart::Regs, &|w| put_regs(w, &self.regs));
        part(VcpuPart::Sregs, &|w| put_sregs(w, &self.sregs));
        if let Some(f) = &self.fpu {
            part(VcpuPart::Fpu, &|w| put_fpu(w, f));
        }
        if let Some(x) = &self.xsave {
            part(VcpuPart::Xsave, &|w| w.put(x));
        }
        if let Some(x) = &self.xcrs {
            part(VcpuPart::Xcrs, &|w| put_xcrs(w, x));
        }
        if !self.msrs.is_empty() {
            part(VcpuPart::Msrs, &|w| {
                for m in &self.msrs {
                    w.u32(m.index);
                    w.u64(m.data);
                }
            });
        }
        if let Some(l) = &self.lapic {
            part(VcpuPart::Lapic, &|w| {
                for &b in &l.regs {
                    w.u8(b as u8);
                }
            });
        }
        if let Some(e) = &self.events {
            part(VcpuPart::Events, &|w| put_events(w, e));
        }
        if let Some(m) = &self.mp_state {
            part(VcpuPart::MpState, &|w| w.u32(m.mp_state));
        }
        if let Some(d) = &self.debugregs {
            part(VcpuPart::DebugRegs, &|w| put_debugregs(w, d));
        }
        if let Some(k) = self.tsc_khz {
            part(VcpuPart::TscKhz, &|w| w.u32(k));
        }
        out
    }

    /// The version-2 encoding (see the module docs). A state whose XSAVE
    /// area or MSR list is above the decoder's bounds
    /// ([`MAX_XSAVE_LEN`], [`MAX_MSRS`]) encodes, but its blob is refused
    /// by [`VcpuState::from_bytes`]; states [`crate::vcpu::Vcpu::save`]
    /// returns are within them.
    pub fn to_bytes(&self) -> Vec<u8> {
        let bodies = self.bodies();
        let total: usize = bodies.iter().map(|(_, b)| b.len()).sum();
        let mut w = Writer(Vec::with_capacity(
            HEADER_LEN + TABLE_ENTRY_LEN * bodies.len() + total + CHECKSUM_LEN,
        ));
        w.put(&MAGIC);
        w.u32(VERSION);
        w.u32(bodies.len() as u32);
        for (p, b) in &bodies {
            w.u32(*p as u32);
            // Bodies are bounded far below 4 GiB (an XSAVE area or MSR
            // list that large does not exist), so this never saturates in
            // practice; if it did the decoder would refuse the blob.
            w.u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
        }
        for (_, b) in &bodies {
            w.put(b);
        }
        let sum = fnv1a(&w.0);
        w.u64(sum);
        w.0
    }

    /// Decodes a blob from [`VcpuState::to_bytes`] (version 2, or the
    /// older version 1), checking its magic, version, part table, lengths,
    /// checksum and fields before using any of it.
    pub fn from_bytes(blob: &[u8]) -> Result<VcpuState, VcpuStateError> {
        decode(blob)
    }

    /// SSE register `xmm<i>` (0..16) as the guest sees it, from the XSAVE
    /// area or the FPU part; `None` if the state has neither or `i` is out
    /// of range.
    pub fn xmm(&self, i: usize) -> Option<[u8; 16]> {
        if i >= 16 {
            return None;
        }
        if let Some(x) = &self.xsave {
            return x.get(XSAVE_XMM0 + 16 * i..)?.get(..16)?.try_into().ok();
        }
        self.fpu.map(|f| f.xmm[i])
    }

    /// The value of MSR `index` in this state, if it was saved.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.data)
    }

    /// The saved time stamp counter (`IA32_TSC`), if it was saved.
    pub fn tsc(&self) -> Option<u64> {
        self.msr(MSR_IA32_TSC)
    }

    /// This state without its TSC, which keeps counting while a vCPU is
    /// paused.
    pub fn without_tsc(mut self) -> VcpuState {
        self.msrs.retain(|m| m.index != MSR_IA32_TSC);
        self
    }

    /// This state in a form two saves of one paused vCPU agree on: without
    /// its TSC ([`VcpuState::without_tsc`]), and with the XSAVE header's
    /// in-use bits (`XSTATE_BV`) cleared for the x87, SSE and AVX
    /// components whose registers hold their initial values. Whether such a
    /// component is reported in use depends on the host's lazy FPU
    /// handling, not on the guest: seen on this nested KVM, the SSE bit of
    /// one paused vCPU's state came back 1 in one save and 0 in the next,
    /// with every XMM register zero in both. The registers are the same
    /// either way; compare states this way.
    pub fn comparable(self) -> VcpuState {
        let mut state = self.without_tsc();
        if let Some(area) = state.xsave.as_mut() {
            clear_init_components(area);
        }
        state
    }
}

/// Where the XSAVE header's `XSTATE_BV` is, in the standard format
/// `KVM_GET_XSAVE2` writes.
const XSTATE_BV: std::ops::Range<usize> = 512..520;

/// Clears the `XSTATE_BV` bit of each of the x87 (bit 0), SSE (bit 1)
/// and AVX (bit 2) components whose saved registers are in their initial
/// state: x87 with FCW 0x037F and every other byte of its part of the
/// legacy area zero, SSE with XMM0-15 zero, AVX with the upper halves of
/// YMM0-15 zero. (MXCSR belongs to neither bit's test: it is saved
/// whenever SSE or AVX is requested, in use or not.)
fn clear_init_components(area: &mut [u8]) {
    let Some(bv) = area.get(XSTATE_BV) else {
        return;
    };
    let mut bv = u64::from_le_bytes(bv.try_into().unwrap_or_default());
    let zero = |r: std::ops::Range<usize>| area.get(r).is_some_and(|b| b.iter().all(|&x| x == 0));
    // FCW (0..2) is 0x037F initially; FSW, abridged FTW, FOP, FIP, FDP
    // (2..24) and ST0-7 (32..160) are zero. MXCSR (24..32) is not x87's.
    let x87_init = area.get(0..2) == Some(&[0x7f, 0x03][..]) && zero(2..24) && zero(32..160);
    for (bit, init) in [(0, x87_init), (1, zero(160..416)), (2, zero(576..832))] {
        if init {
            bv &= !(1u64 << bit);
        }
    }
    area[XSTATE_BV].copy_from_slice(&bv.to_le_bytes());
}

/// `IA32_TSC`: the time stamp counter, saved among the MSRs.
pub const MSR_IA32_TSC: u32 = 0x10;

fn decode(blob: &[u8]) -> Result<VcpuState, VcpuStateError> {
    let mut r = Reader(blob);
    let header = r
        .take(HEADER_LEN)
        .ok_or(VcpuStateError::Truncated { len: blob.len() })?;
    let mut h = Reader(header);
    let magic: [u8; 8] = h.array().unwrap_or_default();
    if magic != MAGIC {
        return Err(VcpuStateError::Magic { found: magic });
    }
    let version = h.u32().unwrap_or_default();
    let word = h.u32().unwrap_or_default();
    match version {
        VERSION_1 => decode_v1(blob, word),
        VERSION => decode_v2(blob, word),
        found => Err(VcpuStateError::Version { found }),
    }
}

fn checksum(blob: &[u8]) -> Result<(), VcpuStateError> {
    let at = blob.len().saturating_sub(CHECKSUM_LEN);
    let (signed, sum) = blob.split_at(at);
    let stored = Reader(sum).u64().unwrap_or_default();
    let computed = fnv1a(signed);
    if stored != computed {
        return Err(VcpuStateError::Checksum { stored, computed });
    }
    Ok(())
}

fn decode_v1(blob: &[u8], body_len: u32) -> Result<VcpuState, VcpuStateError> {
    let length = VcpuStateError::Length {
        len: blob.len(),
        body_len,
    };
    if body_len as usize != BODY_LEN_V1 || blob.len() != ENCODED_LEN_V1 {
        return Err(length);
    }
    checksum(blob)?;
    let body = blob
        .get(HEADER_LEN..HEADER_LEN + BODY_LEN_V1)
        .ok_or(length.clone())?;
    let (regs, sregs) = body.split_at(REGS_LEN);
    Ok(VcpuState {
        regs: get_regs(regs)?,
        sregs: get_sregs(sregs)?,
        ..VcpuState::default()
    })
}

fn decode_v2(blob: &[u8], count: u32) -> Result<VcpuState, VcpuStateError> {
    if !(2..=MAX_PARTS).contains(&count) {
        return Err(VcpuStateError::PartCount { count });
    }
    let table_end = HEADER_LEN + TABLE_ENTRY_LEN * count as usize;
    let table = blob
        .get(HEADER_LEN..table_end)
        .ok_or(VcpuStateError::TableTruncated {
            len: blob.len(),
            count,
            needed: table_end,
        })?;
    let mut t = Reader(table);
    let mut parts: Vec<(VcpuPart, usize)> = Vec::with_capacity(count as usize);
    let mut expected = table_end + CHECKSUM_LEN;
    while let (Some(tag), Some(len)) = (t.u32(), t.u32()) {
        let part = VcpuPart::from_tag(tag).ok_or(VcpuStateError::UnknownPart { tag })?;
        if parts.iter().any(|(p, _)| *p == part) {
            return Err(VcpuStateError::DuplicatePart { part });
        }
        if len as usize > part.max_len() {
            return Err(VcpuStateError::PartTooLong {
                part,
                len,
                max: part.max_len(),
            });
        }
        // At most 11 parts of at most 64 KiB each: no overflow.
        expected += len as usize;
        parts.push((part, len as usize));
    }
    if blob.len() != expected {
        return Err(VcpuStateError::TotalLength {
            len: blob.len(),
            expected,
        });
    }
    checksum(blob)?;
    for part in [VcpuPart::Regs, VcpuPart::Sregs] {
        if !parts.iter().any(|(p, _)| *p == part) {
            return Err(VcpuStateError::MissingPart { part });
        }
    }
    let mut bodies = Reader(blob.get(table_end..).unwrap_or_default());
    let mut st = VcpuState::default();
    for (part, len) in parts {
        // The total length matched, so every body is there.
        let body = bodies.take(len).ok_or(VcpuStateError::TotalLength {
            len: blob.len(),
            expected,
        })?;
        decode_part(&mut st, part, body)?;
    }
    Ok(st)
}

fn exact(
    part: VcpuPart,
    body: &[u8],
    len: usize,
    expected: &'static str,
) -> Result<(), VcpuStateError> {
    if body.len() != len {
        return Err(VcpuStateError::PartLength {
            part,
            len: body.len(),
            expected,
        });
    }
    Ok(())
}

fn decode_part(st: &mut VcpuState, part: VcpuPart, body: &[u8]) -> Result<(), VcpuStateError> {
    // Every read below is within a body whose length was checked first;
    // they go through `Reader` anyway so a wrong constant is an error, not
    // a panic.
    let short = VcpuStateError::PartLength {
        part,
        len: body.len(),
        expected: "longer",
    };
    let mut r = Reader(body);
    match part {
        VcpuPart::Regs => {
            exact(part, body, REGS_LEN, "144 bytes")?;
            st.regs = get_regs(body)?;
        }
        VcpuPart::Sregs => {
            exact(part, body, SREGS_LEN, "292 bytes")?;
            st.sregs = get_sregs(body)?;
        }
        VcpuPart::Fpu => {
            exact(part, body, FPU_LEN, "411 bytes")?;
            let mut f = kvm_fpu::default();
            for reg in &mut f.fpr {
                *reg = r.array().ok_or(short.clone())?;
            }
            f.fcw = r.u16().ok_or(short.clone())?;
            f.fsw = r.u16().ok_or(short.clone())?;
            f.ftwx = r.u8().ok_or(short.clone())?;
            f.last_opcode = r.u16().ok_or(short.clone())?;
            f.last_ip = r.u64().ok_or(short.clone())?;
            f.last_dp = r.u64().ok_or(short.clone())?;
            for reg in &mut f.xmm {
                *reg = r.array().ok_or(short.clone())?;
            }
            f.mxcsr = r.u32().ok_or(short)?;
            st.fpu = Some(f);
        }
        VcpuPart::Xsave => {
            if body.len() < MIN_XSAVE_LEN || body.len() % 4 != 0 {
                return Err(VcpuStateError::PartLength {
                    part,
                    len: body.len(),
                    expected: "a multiple of 4 bytes, at least 4096",
                });
            }
            st.xsave = Some(body.to_vec());
        }
        VcpuPart::Xcrs => {
            let n = r.u32().ok_or(VcpuStateError::PartLength {
                part,
                len: body.len(),
                expected: "at least 8 bytes",
            })?;
            if n as usize > MAX_XCRS {
                return Err(VcpuStateError::Field {
                    field: "xcrs.count".into(),
                    value: n.into(),
                    max: MAX_XCRS as u64,
                });
            }
            exact(
                part,
                body,
                8 + n as usize * XCR_LEN,
                "8 bytes plus 12 per XCR",
            )?;
            let mut x = kvm_xcrs {
                nr_xcrs: n,
                flags: r.u32().ok_or(short.clone())?,
                ..Default::default()
            };
            for xcr in &mut x.xcrs[..n as usize] {
                *xcr = kvm_xcr {
                    xcr: r.u32().ok_or(short.clone())?,
                    reserved: 0,
                    value: r.u64().ok_or(short.clone())?,
                };
            }
            st.xcrs = Some(x);
        }
        VcpuPart::Msrs => {
            if body.is_empty() || body.len() % MSR_LEN != 0 {
                return Err(VcpuStateError::PartLength {
                    part,
                    len: body.len(),
                    expected: "a non-zero multiple of 12 bytes",
                });
            }
            st.msrs = body
                .chunks_exact(MSR_LEN)
                .map(|c| {
                    let mut r = Reader(c);
                    Some(Msr {
                        index: r.u32()?,
                        data: r.u64()?,
                    })
                })
                .collect::<Option<_>>()
                .ok_or(short)?;
        }
        VcpuPart::Lapic => {
            exact(part, body, LAPIC_LEN, "1024 bytes")?;
            let mut l = kvm_lapic_state::default();
            for (d, &s) in l.regs.iter_mut().zip(body) {
                *d = s as std::os::raw::c_char;
            }
            st.lapic = Some(l);
        }
        VcpuPart::Events => {
            exact(part, body, EVENTS_LEN, "37 bytes")?;
            let mut e = kvm_vcpu_events::default();
            let [a, b, c, d]: [u8; 4] = r.array().ok_or(short.clone())?;
            (e.exception.injected, e.exception.nr) = (a, b);
            (e.exception.has_error_code, e.exception.pending) = (c, d);
            e.exception.error_code = r.u32().ok_or(short.clone())?;
            let [a, b, c, d]: [u8; 4] = r.array().ok_or(short.clone())?;
            (e.interrupt.injected, e.interrupt.nr) = (a, b);
            (e.interrupt.soft, e.interrupt.shadow) = (c, d);
            let [a, b, c]: [u8; 3] = r.array().ok_or(short.clone())?;
            (e.nmi.injected, e.nmi.pending, e.nmi.masked) = (a, b, c);
            e.sipi_vector = r.u32().ok_or(short.clone())?;
            e.flags = r.u32().ok_or(short.clone())?;
            let [a, b, c, d]: [u8; 4] = r.array().ok_or(short.clone())?;
            (e.smi.smm, e.smi.pending) = (a, b);
            (e.smi.smm_inside_nmi, e.smi.latched_init) = (c, d);
            e.triple_fault.pending = r.u8().ok_or(short.clone())?;
            e.exception_has_payload = r.u8().ok_or(short.clone())?;
            e.exception_payload = r.u64().ok_or(short)?;
            st.events = Some(e);
        }
        VcpuPart::MpState => {
            exact(part, body, 4, "4 bytes")?;
            st.mp_state = Some(kvm_mp_state {
                mp_state: r.u32().ok_or(short)?,
            });
        }
        VcpuPart::DebugRegs => {
            exact(part, body, DEBUGREGS_LEN, "56 bytes")?;
            let mut d = kvm_debugregs::default();
            for v in
                d.db.iter_mut()
                    .chain([&mut d.dr6, &mut d.dr7, &mut d.flags])
            {
                *v = r.u64().ok_or(short.clone())?;
            }
            st.debugregs = Some(d);
        }
        VcpuPart::TscKhz => {
            exact(part, body, 4, "4 bytes")?;
            st.tsc_khz = Some(r.u32().ok_or(short)?);
        }
    }
    Ok(())
}

fn get_regs(body: &[u8]) -> Result<kvm_regs, VcpuStateError> {
    let short = VcpuStateError::PartLength {
        part: VcpuPart::Regs,
        len: body.len(),
        expected: "144 bytes",
    };
    let mut r = Reader(body);
    let mut regs = [0u64; 18];
    for w in &mut regs {
        *w = r.u64().ok_or(short.clone())?;
    }
    let [rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags] =
        regs;
    Ok(kvm_regs {
        rax,
        rbx,
        rcx,
        rdx,
        rsi,
        rdi,
        rsp,
        rbp,
        r8,
        r9,
        r10,
        r11,
        r12,
        r13,
        r14,
        r15,
        rip,
        rflags,
    })
}

fn get_sregs(body: &[u8]) -> Result<kvm_sregs, VcpuStateError> {
    let short = VcpuStateError::PartLength {
        part: VcpuPart::Sregs,
        len: body.len(),
        expected: "292 bytes",
    };
    let mut r = Reader(body);
    let mut sregs = kvm_sregs::default();
    let names = segments(&kvm_sregs::default()).map(|(n, _)| n);
    let mut segs = [kvm_segment::default(); 8];
    for (seg, name) in segs.iter_mut().zip(names) {
        seg.base = r.u64().ok_or(short.clone())?;
        seg.limit = r.u32().ok_or(short.clone())?;
        seg.selector = r.u16().ok_or(short.clone())?;
        let bytes: [u8; 9] = r.array().ok_or(short.clone())?;
        let fields = segment_bytes(&kvm_segment::default());
        for ((field, _, max), value) in fields.into_iter().zip(bytes) {
            if value > max {
                return Err(VcpuStateError::Field {
                    field: format!("{name}.{field}"),
                    value: value.into(),
                    max: max.into(),
                });
            }
        }
        let [type_, present, dpl, db, s, l, g, avl, unusable] = bytes;
        (seg.type_, seg.present, seg.dpl, seg.db, seg.s) = (type_, present, dpl, db, s);
        (seg.l, seg.g, seg.avl, seg.unusable) = (l, g, avl, unusable);
    }
    [
        sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss, sregs.tr, sregs.ldt,
    ] = segs;
    for t in [&mut sregs.gdt, &mut sregs.idt] {
        *t = kvm_dtable {
            base: r.u64().ok_or(short.clone())?,
            limit: r.u16().ok_or(short.clone())?,
            padding: [0; 3],
        };
    }
    for w in [
        &mut sregs.cr0,
        &mut sregs.cr2,
        &mut sregs.cr3,
        &mut sregs.cr4,
        &mut sregs.cr8,
        &mut sregs.efer,
        &mut sregs.apic_base,
    ]
    .into_iter()
    .chain(&mut sregs.interrupt_bitmap)
    {
        *w = r.u64().ok_or(short.clone())?;
    }
    Ok(sregs)
}

/// A cursor over a byte slice whose reads fail instead of panicking.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        self.array().map(u8::from_le_bytes)
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests;
