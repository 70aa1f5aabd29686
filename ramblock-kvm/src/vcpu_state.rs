//! [`VcpuState`]: the register state a paused vCPU hands to its destination
//! at post-copy switch-over, and its wire encoding.
//!
//! The state is `KVM_GET_REGS` plus `KVM_GET_SREGS`: general registers,
//! `rip`, `rflags`, segments, descriptor tables, control registers, EFER,
//! the APIC base and the pending-interrupt bitmap. That is all the test
//! guests use; FPU/SSE state (`KVM_GET_FPU`, `KVM_GET_XCRS`), MSRs, vCPU
//! events and the local APIC are not carried, so a guest that relies on
//! them needs a later version of this format.
//!
//! The blob crosses the network, so [`VcpuState::from_bytes`] trusts
//! nothing: a version-1 blob is, all little-endian,
//!
//! | bytes | field |
//! |-------|-------|
//! | 8     | magic `RBLKVCPU` |
//! | 4     | version (1) |
//! | 4     | body length ([`BODY_LEN_V1`]) |
//! | body  | 18 `kvm_regs` words, then 8 segments (base 8, limit 4, selector 2, 9 one-byte fields), GDT and IDT (base 8, limit 2), cr0, cr2, cr3, cr4, cr8, efer, apic_base, 4 interrupt-bitmap words |
//! | 8     | FNV-1a 64 of everything before it |
//!
//! and anything else (short, long, another magic or version, a checksum
//! that does not match, a segment field out of its bit range) is a
//! [`VcpuStateError`].

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};

/// The first eight bytes of every encoded [`VcpuState`].
pub const MAGIC: [u8; 8] = *b"RBLKVCPU";
/// The encoding [`VcpuState::to_bytes`] writes.
pub const VERSION: u32 = 1;
/// Bytes of a version-1 body.
pub const BODY_LEN_V1: usize = REGS_LEN + 8 * SEGMENT_LEN + 2 * DTABLE_LEN + 11 * 8;
/// Bytes of a whole version-1 blob.
pub const ENCODED_LEN_V1: usize = HEADER_LEN + BODY_LEN_V1 + CHECKSUM_LEN;

const HEADER_LEN: usize = 16;
const CHECKSUM_LEN: usize = 8;
const REGS_LEN: usize = 18 * 8;
const SEGMENT_LEN: usize = 8 + 4 + 2 + 9;
const DTABLE_LEN: usize = 8 + 2;

/// A vCPU's register state (see the module docs for what it covers).
#[derive(Copy, Clone, Debug, Default, PartialEq)]
pub struct VcpuState {
    /// General registers, `rip` and `rflags` (`KVM_GET_REGS`).
    pub regs: kvm_regs,
    /// Segments, tables, control registers (`KVM_GET_SREGS`).
    pub sregs: kvm_sregs,
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
    #[error("vCPU state blob is version {found}, this build reads version {VERSION}; run the same ramblock on both ends")]
    Version {
        /// The version in the blob.
        found: u32,
    },
    /// The header's body length or the blob's length is wrong.
    #[error("vCPU state blob is {len} bytes with a body length of {body_len}; version {VERSION} is exactly {ENCODED_LEN_V1} bytes with a {BODY_LEN_V1}-byte body; it was cut short or padded, resend it")]
    Length {
        /// Bytes received.
        len: usize,
        /// Body length the header declares.
        body_len: u32,
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
        /// Which field (`"cs.dpl"`, ...).
        field: String,
        /// The value found.
        value: u8,
        /// The largest valid value.
        max: u8,
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

impl VcpuState {
    /// The version-1 encoding (see the module docs), [`ENCODED_LEN_V1`]
    /// bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ENCODED_LEN_V1);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(BODY_LEN_V1 as u32).to_le_bytes());
        for w in regs_words(&self.regs) {
            out.extend_from_slice(&w.to_le_bytes());
        }
        let s = &self.sregs;
        for (_, seg) in segments(s) {
            out.extend_from_slice(&seg.base.to_le_bytes());
            out.extend_from_slice(&seg.limit.to_le_bytes());
            out.extend_from_slice(&seg.selector.to_le_bytes());
            out.extend(segment_bytes(seg).map(|(_, v, _)| v));
        }
        for t in [&s.gdt, &s.idt] {
            out.extend_from_slice(&t.base.to_le_bytes());
            out.extend_from_slice(&t.limit.to_le_bytes());
        }
        let words = [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base];
        for w in words.iter().chain(&s.interrupt_bitmap) {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&fnv1a(&out).to_le_bytes());
        debug_assert_eq!(out.len(), ENCODED_LEN_V1);
        out
    }

    /// Decodes a blob from [`VcpuState::to_bytes`], checking its magic,
    /// version, lengths, checksum and segment fields before using any of it.
    pub fn from_bytes(blob: &[u8]) -> Result<VcpuState, crate::GuestError> {
        Ok(decode(blob)?)
    }
}

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
    let version = u32::from_le_bytes(h.array().unwrap_or_default());
    if version != VERSION {
        return Err(VcpuStateError::Version { found: version });
    }
    let body_len = u32::from_le_bytes(h.array().unwrap_or_default());
    if body_len as usize != BODY_LEN_V1 || blob.len() != ENCODED_LEN_V1 {
        return Err(VcpuStateError::Length {
            len: blob.len(),
            body_len,
        });
    }
    let (signed, sum) = blob.split_at(ENCODED_LEN_V1 - CHECKSUM_LEN);
    let stored = u64::from_le_bytes(Reader(sum).array().unwrap_or_default());
    let computed = fnv1a(signed);
    if stored != computed {
        return Err(VcpuStateError::Checksum { stored, computed });
    }
    // From here the length is exact, so every read below succeeds; they
    // still go through `Reader` so that a wrong constant is an error, not
    // a panic.
    let short = VcpuStateError::Length {
        len: blob.len(),
        body_len,
    };
    let mut regs = [0u64; 18];
    for w in &mut regs {
        *w = r.u64().ok_or(short.clone())?;
    }
    let [rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags] =
        regs;
    let regs = kvm_regs {
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
    };
    let mut sregs = kvm_sregs::default();
    let names = segments(&kvm_sregs::default()).map(|(n, _)| n);
    let mut segs = [kvm_segment::default(); 8];
    for (seg, name) in segs.iter_mut().zip(names) {
        seg.base = r.u64().ok_or(short.clone())?;
        seg.limit = u32::from_le_bytes(r.array().ok_or(short.clone())?);
        seg.selector = u16::from_le_bytes(r.array().ok_or(short.clone())?);
        let bytes: [u8; 9] = r.array().ok_or(short.clone())?;
        let fields = segment_bytes(&kvm_segment::default());
        for ((field, _, max), value) in fields.into_iter().zip(bytes) {
            if value > max {
                return Err(VcpuStateError::Field {
                    field: format!("{name}.{field}"),
                    value,
                    max,
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
            limit: u16::from_le_bytes(r.array().ok_or(short.clone())?),
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
    Ok(VcpuState { regs, sregs })
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

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GuestError;

    /// A state with every field distinct, so a swapped or dropped field
    /// shows up in the round trip.
    fn sample() -> VcpuState {
        let mut n = 0u64;
        let mut next = || {
            n += 1;
            n * 0x0101_0101_0101_0101 + n
        };
        let mut st = VcpuState::default();
        let r = &mut st.regs;
        for w in [
            &mut r.rax,
            &mut r.rbx,
            &mut r.rcx,
            &mut r.rdx,
            &mut r.rsi,
            &mut r.rdi,
            &mut r.rsp,
            &mut r.rbp,
            &mut r.r8,
            &mut r.r9,
            &mut r.r10,
            &mut r.r11,
            &mut r.r12,
            &mut r.r13,
            &mut r.r14,
            &mut r.r15,
            &mut r.rip,
            &mut r.rflags,
        ] {
            *w = next();
        }
        let s = &mut st.sregs;
        for (i, seg) in [
            &mut s.cs, &mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss, &mut s.tr, &mut s.ldt,
        ]
        .into_iter()
        .enumerate()
        {
            let i = i as u8;
            *seg = kvm_segment {
                base: next(),
                limit: next() as u32,
                selector: next() as u16,
                type_: i + 3,
                present: i & 1,
                dpl: i % 4,
                db: (i >> 1) & 1,
                s: (i >> 2) & 1,
                l: i & 1 ^ 1,
                g: 1,
                avl: (i >> 1) & 1 ^ 1,
                unusable: (i >> 2) & 1 ^ 1,
                padding: 0,
            };
        }
        s.gdt = kvm_dtable {
            base: next(),
            limit: 0x2f,
            padding: [0; 3],
        };
        s.idt = kvm_dtable {
            base: next(),
            limit: 0x7ff,
            padding: [0; 3],
        };
        for w in [
            &mut s.cr0,
            &mut s.cr2,
            &mut s.cr3,
            &mut s.cr4,
            &mut s.cr8,
            &mut s.efer,
            &mut s.apic_base,
        ]
        .into_iter()
        .chain(&mut s.interrupt_bitmap)
        {
            *w = next();
        }
        st
    }

    fn err(blob: &[u8]) -> VcpuStateError {
        match VcpuState::from_bytes(blob) {
            Err(GuestError::VcpuState(e)) => e,
            other => panic!("expected a VcpuStateError, got {other:?}"),
        }
    }

    /// Re-signs a blob after an edit, so the check under test is the one
    /// that fires, not the checksum.
    fn resign(blob: &mut [u8]) {
        let at = blob.len() - CHECKSUM_LEN;
        let sum = fnv1a(&blob[..at]);
        blob[at..].copy_from_slice(&sum.to_le_bytes());
    }

    #[test]
    fn states_round_trip_exactly() {
        for st in [VcpuState::default(), sample()] {
            let blob = st.to_bytes();
            assert_eq!(blob.len(), ENCODED_LEN_V1);
            assert!(blob.len() < 4096);
            assert_eq!(VcpuState::from_bytes(&blob).unwrap(), st);
        }
        // Little-endian at fixed places: rax right after the header, the
        // checksum last.
        let blob = sample().to_bytes();
        assert_eq!(&blob[..8], b"RBLKVCPU");
        assert_eq!(blob[8..12], 1u32.to_le_bytes());
        assert_eq!(blob[16..24], sample().regs.rax.to_le_bytes());
    }

    #[test]
    fn every_truncation_is_refused() {
        let blob = sample().to_bytes();
        for len in 0..blob.len() {
            let e = err(&blob[..len]);
            if len < HEADER_LEN {
                assert_eq!(e, VcpuStateError::Truncated { len }, "{len}");
            } else {
                assert!(matches!(e, VcpuStateError::Length { .. }), "{len}: {e}");
            }
        }
        let mut long = blob.clone();
        long.push(0);
        assert!(matches!(err(&long), VcpuStateError::Length { .. }));
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let blob = sample().to_bytes();
        for at in 0..blob.len() {
            for bit in 0..8 {
                let mut bad = blob.clone();
                bad[at] ^= 1 << bit;
                let e = err(&bad);
                let want_kind = match at {
                    0..8 => matches!(e, VcpuStateError::Magic { .. }),
                    8..12 => matches!(e, VcpuStateError::Version { .. }),
                    12..16 => matches!(e, VcpuStateError::Length { .. }),
                    _ => matches!(e, VcpuStateError::Checksum { .. }),
                };
                assert!(want_kind, "byte {at} bit {bit}: {e}");
            }
        }
    }

    #[test]
    fn out_of_range_segment_fields_are_refused_even_when_signed() {
        let mut blob = sample().to_bytes();
        // cs.dpl: the third one-byte field of the first segment.
        let at = HEADER_LEN + REGS_LEN + 8 + 4 + 2 + 2;
        blob[at] = 4;
        resign(&mut blob);
        assert_eq!(
            err(&blob),
            VcpuStateError::Field {
                field: "cs.dpl".into(),
                value: 4,
                max: 3
            }
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic spray of blobs of every length up to two
        // encodings, some with a valid header.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..2 * ENCODED_LEN_V1 {
            let mut blob: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            assert!(VcpuState::from_bytes(&blob).is_err());
            if len >= HEADER_LEN {
                blob[..8].copy_from_slice(&MAGIC);
                blob[8..12].copy_from_slice(&VERSION.to_le_bytes());
                blob[12..16].copy_from_slice(&(BODY_LEN_V1 as u32).to_le_bytes());
                assert!(VcpuState::from_bytes(&blob).is_err());
            }
        }
    }
}
