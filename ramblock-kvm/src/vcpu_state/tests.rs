//! The encoding's round trip and its refusal of every malformed blob.

use super::*;

/// A state with every field distinct and every part present, so a
/// swapped or dropped field shows up in the round trip.
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
    let mut fpu = kvm_fpu::default();
    for (i, r) in fpu.fpr.iter_mut().chain(&mut fpu.xmm).enumerate() {
        *r = [i as u8 + 1; 16];
        r[15] = 0xa0;
    }
    (fpu.fcw, fpu.fsw, fpu.ftwx, fpu.last_opcode) = (0x37f, 0x3800, 0x81, 0x7ff);
    (fpu.last_ip, fpu.last_dp, fpu.mxcsr) = (next(), next(), 0x1f80);
    st.fpu = Some(fpu);
    st.xsave = Some((0..4096 + 2 * 64).map(|i| (i * 7 + 3) as u8).collect());
    let mut xcrs = kvm_xcrs {
        nr_xcrs: 2,
        flags: 0,
        ..Default::default()
    };
    xcrs.xcrs[0] = kvm_xcr {
        xcr: 0,
        reserved: 0,
        value: 7,
    };
    xcrs.xcrs[1] = kvm_xcr {
        xcr: 1,
        reserved: 0,
        value: next(),
    };
    st.xcrs = Some(xcrs);
    st.msrs = (0..40)
        .map(|i| Msr {
            index: 0xc000_0080 + i,
            data: next(),
        })
        .collect();
    let mut lapic = kvm_lapic_state::default();
    for (i, b) in lapic.regs.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(13) as std::os::raw::c_char;
    }
    st.lapic = Some(lapic);
    let mut e = kvm_vcpu_events::default();
    (e.exception.injected, e.exception.nr) = (1, 14);
    (e.exception.has_error_code, e.exception.pending) = (1, 0);
    e.exception.error_code = 6;
    (e.interrupt.injected, e.interrupt.nr, e.interrupt.soft) = (1, 0x30, 0);
    e.interrupt.shadow = 1;
    (e.nmi.injected, e.nmi.pending, e.nmi.masked) = (0, 1, 1);
    (e.sipi_vector, e.flags) = (0x9a, 0x1d);
    (e.smi.smm, e.smi.pending, e.smi.smm_inside_nmi) = (0, 1, 0);
    e.smi.latched_init = 1;
    (e.triple_fault.pending, e.exception_has_payload) = (0, 1);
    e.exception_payload = next();
    st.events = Some(e);
    st.mp_state = Some(kvm_mp_state { mp_state: 3 });
    st.debugregs = Some(kvm_debugregs {
        db: [next(), next(), next(), next()],
        dr6: 0xffff_0ff0,
        dr7: 0x400,
        flags: 0,
        reserved: [0; 9],
    });
    st.tsc_khz = Some(2_345_678);
    st
}

/// The minimal state: regs and sregs only.
fn minimal() -> VcpuState {
    VcpuState {
        regs: sample().regs,
        sregs: sample().sregs,
        ..VcpuState::default()
    }
}

fn err(blob: &[u8]) -> VcpuStateError {
    match VcpuState::from_bytes(blob) {
        Err(e) => e,
        Ok(st) => panic!("expected a VcpuStateError, got {st:?}"),
    }
}

/// Re-signs a blob after an edit, so the check under test is the one
/// that fires, not the checksum.
fn resign(blob: &mut [u8]) {
    let at = blob.len() - CHECKSUM_LEN;
    let sum = fnv1a(&blob[..at]);
    blob[at..].copy_from_slice(&sum.to_le_bytes());
}

/// Where part `k`'s table entry starts.
fn entry(k: usize) -> usize {
    HEADER_LEN + TABLE_ENTRY_LEN * k
}

/// Where `part`'s body starts in `blob`.
fn body_at(blob: &[u8], part: VcpuPart) -> usize {
    let n = u32::from_le_bytes(blob[12..16].try_into().unwrap()) as usize;
    let mut at = entry(n);
    for k in 0..n {
        let e = &blob[entry(k)..entry(k + 1)];
        if u32::from_le_bytes(e[..4].try_into().unwrap()) == part as u32 {
            return at;
        }
        at += u32::from_le_bytes(e[4..].try_into().unwrap()) as usize;
    }
    panic!("no {part} part");
}

#[test]
fn states_round_trip_exactly() {
    for st in [VcpuState::default(), minimal(), sample()] {
        let blob = st.to_bytes();
        assert_eq!(VcpuState::from_bytes(&blob).unwrap(), st);
    }
    let blob = minimal().to_bytes();
    assert_eq!(blob.len(), HEADER_LEN + 2 * 8 + BODY_LEN_V1 + CHECKSUM_LEN);
    // Every part present, and each of its own length.
    let blob = sample().to_bytes();
    assert_eq!(&blob[..8], b"RBLKVCPU");
    assert_eq!(blob[8..12], 2u32.to_le_bytes());
    assert_eq!(blob[12..16], 11u32.to_le_bytes());
    let lens: Vec<(u32, u32)> = (0..11)
        .map(|k| {
            let e = &blob[entry(k)..entry(k + 1)];
            (
                u32::from_le_bytes(e[..4].try_into().unwrap()),
                u32::from_le_bytes(e[4..].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(
        lens,
        [
            (1, 144),
            (2, 292),
            (3, 411),
            (4, 4224),
            (5, 32),
            (6, 480),
            (7, 1024),
            (8, 37),
            (9, 4),
            (10, 56),
            (11, 4)
        ]
    );
    // rax right after the table, little-endian.
    assert_eq!(blob[entry(11)..][..8], sample().regs.rax.to_le_bytes());
    // Every part alone (with the two required ones) round-trips too.
    let full = sample();
    for part in VcpuPart::ALL {
        let mut st = minimal();
        match part {
            VcpuPart::Regs | VcpuPart::Sregs => {}
            VcpuPart::Fpu => st.fpu = full.fpu,
            VcpuPart::Xsave => st.xsave = full.xsave.clone(),
            VcpuPart::Xcrs => st.xcrs = full.xcrs,
            VcpuPart::Msrs => st.msrs = full.msrs.clone(),
            VcpuPart::Lapic => st.lapic = full.lapic,
            VcpuPart::Events => st.events = full.events,
            VcpuPart::MpState => st.mp_state = full.mp_state,
            VcpuPart::DebugRegs => st.debugregs = full.debugregs,
            VcpuPart::TscKhz => st.tsc_khz = full.tsc_khz,
        }
        assert_eq!(VcpuState::from_bytes(&st.to_bytes()).unwrap(), st, "{part}");
    }
}

#[test]
fn xmm_and_msr_accessors_read_the_state() {
    let mut st = sample();
    // The XSAVE area wins over the FPU part.
    let x = st.xsave.clone().unwrap();
    assert_eq!(st.xmm(3).unwrap(), x[160 + 48..160 + 64]);
    st.xsave = None;
    assert_eq!(st.xmm(3), Some(st.fpu.unwrap().xmm[3]));
    assert_eq!(st.xmm(16), None);
    st.fpu = None;
    assert_eq!(st.xmm(0), None);
    assert_eq!(st.msr(0xc000_0081), Some(sample().msrs[1].data));
    assert_eq!(st.msr(0x10), None);
}

/// The version-1 encoding, as the previous build wrote it.
fn v1_blob(st: &VcpuState) -> Vec<u8> {
    let mut w = Writer(Vec::new());
    w.put(&MAGIC);
    w.u32(1);
    w.u32(BODY_LEN_V1 as u32);
    put_regs(&mut w, &st.regs);
    put_sregs(&mut w, &st.sregs);
    let sum = fnv1a(&w.0);
    w.u64(sum);
    w.0
}

#[test]
fn version_1_blobs_are_still_read_and_checked() {
    let blob = v1_blob(&sample());
    assert_eq!(blob.len(), ENCODED_LEN_V1);
    assert_eq!(VcpuState::from_bytes(&blob).unwrap(), minimal());
    for len in 0..blob.len() {
        let e = err(&blob[..len]);
        if len < HEADER_LEN {
            assert_eq!(e, VcpuStateError::Truncated { len }, "{len}");
        } else {
            assert!(matches!(e, VcpuStateError::Length { .. }), "{len}: {e}");
        }
    }
    let mut bad = blob.clone();
    bad[HEADER_LEN] ^= 1;
    assert!(matches!(err(&bad), VcpuStateError::Checksum { .. }));
}

#[test]
fn every_truncation_is_refused() {
    let blob = sample().to_bytes();
    let table_end = entry(11);
    for len in 0..blob.len() {
        let e = err(&blob[..len]);
        let want = if len < HEADER_LEN {
            e == VcpuStateError::Truncated { len }
        } else if len < table_end {
            e == VcpuStateError::TableTruncated {
                len,
                count: 11,
                needed: table_end,
            }
        } else {
            e == VcpuStateError::TotalLength {
                len,
                expected: blob.len(),
            }
        };
        assert!(want, "{len}: {e}");
    }
    let mut long = blob.clone();
    long.push(0);
    assert!(matches!(err(&long), VcpuStateError::TotalLength { .. }));
}

#[test]
fn every_flipped_bit_is_refused() {
    let blob = sample().to_bytes();
    for at in 0..blob.len() {
        // Every bit of the header and table; one bit per body byte (in
        // turn), which the checksum catches alike, to keep this quick.
        let bits = if at < entry(11) {
            0..8
        } else {
            at % 8..at % 8 + 1
        };
        for bit in bits {
            let mut bad = blob.clone();
            bad[at] ^= 1 << bit;
            let e = err(&bad);
            let table = HEADER_LEN..entry(11);
            let want_kind = match at {
                0..8 => matches!(e, VcpuStateError::Magic { .. }),
                8..12 => matches!(e, VcpuStateError::Version { .. }),
                12..16 => matches!(
                    e,
                    VcpuStateError::PartCount { .. } | VcpuStateError::TotalLength { .. }
                ),
                // A tag: unknown or a repeat; a length: too long for its
                // part or not what the blob holds.
                _ if table.contains(&at) => matches!(
                    e,
                    VcpuStateError::UnknownPart { .. }
                        | VcpuStateError::DuplicatePart { .. }
                        | VcpuStateError::PartTooLong { .. }
                        | VcpuStateError::TotalLength { .. }
                ),
                _ => matches!(e, VcpuStateError::Checksum { .. }),
            };
            assert!(want_kind, "byte {at} bit {bit}: {e}");
        }
    }
}

#[test]
fn bad_versions_and_part_counts_are_refused() {
    let mut blob = sample().to_bytes();
    for v in [0u32, 3, u32::MAX] {
        blob[8..12].copy_from_slice(&v.to_le_bytes());
        assert_eq!(err(&blob), VcpuStateError::Version { found: v });
    }
    blob[8..12].copy_from_slice(&VERSION.to_le_bytes());
    for count in [0u32, 1, 12, u32::MAX] {
        blob[12..16].copy_from_slice(&count.to_le_bytes());
        assert_eq!(err(&blob), VcpuStateError::PartCount { count });
    }
}

#[test]
fn oversized_unknown_repeated_and_missing_parts_are_refused() {
    let blob = sample().to_bytes();
    // Each part declared one byte longer than its bound, and 4 GiB - 1.
    for (k, part) in VcpuPart::ALL.into_iter().enumerate() {
        for len in [part.max_len() as u32 + 1, u32::MAX] {
            let mut bad = blob.clone();
            bad[entry(k) + 4..entry(k + 1)].copy_from_slice(&len.to_le_bytes());
            assert_eq!(
                err(&bad),
                VcpuStateError::PartTooLong {
                    part,
                    len,
                    max: part.max_len()
                },
                "{part}"
            );
        }
    }
    for tag in [0u32, 12, 0x8000_0001] {
        let mut bad = blob.clone();
        bad[entry(5)..entry(5) + 4].copy_from_slice(&tag.to_le_bytes());
        assert_eq!(err(&bad), VcpuStateError::UnknownPart { tag });
    }
    let mut bad = blob.clone();
    bad[entry(9)..entry(9) + 4].copy_from_slice(&(VcpuPart::MpState as u32).to_le_bytes());
    assert_eq!(
        err(&bad),
        VcpuStateError::DuplicatePart {
            part: VcpuPart::MpState
        }
    );
    // A state without sregs: retag sregs' entry as another part of the
    // same length is not possible, so drop it from a two-part blob by
    // replacing it with an mp state.
    let mut st = minimal();
    st.mp_state = Some(kvm_mp_state { mp_state: 0 });
    let three = st.to_bytes();
    let mut w = Writer(Vec::new());
    w.put(&MAGIC);
    w.u32(VERSION);
    w.u32(2);
    w.u32(VcpuPart::Regs as u32);
    w.u32(REGS_LEN as u32);
    w.u32(VcpuPart::MpState as u32);
    w.u32(4);
    let regs_at = body_at(&three, VcpuPart::Regs);
    w.put(&three[regs_at..regs_at + REGS_LEN]);
    w.u32(0);
    w.u64(0);
    let mut no_sregs = w.0;
    resign(&mut no_sregs);
    assert_eq!(
        err(&no_sregs),
        VcpuStateError::MissingPart {
            part: VcpuPart::Sregs
        }
    );
}

/// `st`'s blob with `part`'s body replaced by `body` (table and checksum
/// fixed up), so the check of that body is the one that fires.
fn with_body(st: &VcpuState, part: VcpuPart, body: &[u8]) -> Vec<u8> {
    let mut bodies = st.bodies();
    for (p, b) in &mut bodies {
        if *p == part {
            *b = body.to_vec();
        }
    }
    let mut w = Writer(Vec::new());
    w.put(&MAGIC);
    w.u32(VERSION);
    w.u32(bodies.len() as u32);
    for (p, b) in &bodies {
        w.u32(*p as u32);
        w.u32(b.len() as u32);
    }
    for (_, b) in &bodies {
        w.put(b);
    }
    w.u64(0);
    let mut blob = w.0;
    resign(&mut blob);
    blob
}

#[test]
fn parts_of_the_wrong_size_are_refused_even_when_signed() {
    let st = sample();
    let fixed = [
        (VcpuPart::Regs, REGS_LEN),
        (VcpuPart::Sregs, SREGS_LEN),
        (VcpuPart::Fpu, FPU_LEN),
        (VcpuPart::Lapic, LAPIC_LEN),
        (VcpuPart::Events, EVENTS_LEN),
        (VcpuPart::MpState, 4),
        (VcpuPart::DebugRegs, DEBUGREGS_LEN),
        (VcpuPart::TscKhz, 4),
    ];
    for (part, len) in fixed {
        for bad_len in [0, len - 1] {
            let blob = with_body(&st, part, &vec![0; bad_len]);
            assert!(
                matches!(err(&blob), VcpuStateError::PartLength { part: p, len: l, .. } if p == part && l == bad_len),
                "{part} of {bad_len}: {}",
                err(&blob)
            );
        }
    }
    for bad_len in [0, 4095, 4097, 4098, 4099] {
        let blob = with_body(&st, VcpuPart::Xsave, &vec![0; bad_len]);
        assert!(
            matches!(
                err(&blob),
                VcpuStateError::PartLength {
                    part: VcpuPart::Xsave,
                    ..
                }
            ),
            "{bad_len}"
        );
    }
    for bad_len in [0, 1, 11, 13, 25] {
        let blob = with_body(&st, VcpuPart::Msrs, &vec![0; bad_len]);
        assert!(
            matches!(
                err(&blob),
                VcpuStateError::PartLength {
                    part: VcpuPart::Msrs,
                    ..
                }
            ),
            "{bad_len}"
        );
    }
    // XCRs: a count above 16 (in a body within the part's bound), and
    // lengths that do not fit the count.
    let mut body = 17u32.to_le_bytes().to_vec();
    body.extend([0; 4 + 16 * 12]);
    assert_eq!(
        err(&with_body(&st, VcpuPart::Xcrs, &body)),
        VcpuStateError::Field {
            field: "xcrs.count".into(),
            value: 17,
            max: 16
        }
    );
    for body in [vec![0; 3], {
        let mut b = 2u32.to_le_bytes().to_vec();
        b.extend([0; 4 + 12]);
        b
    }] {
        assert!(matches!(
            err(&with_body(&st, VcpuPart::Xcrs, &body)),
            VcpuStateError::PartLength {
                part: VcpuPart::Xcrs,
                ..
            }
        ));
    }
}

#[test]
fn out_of_range_segment_fields_are_refused_even_when_signed() {
    let mut blob = sample().to_bytes();
    // cs.dpl: the third one-byte field of the first segment.
    let at = body_at(&blob, VcpuPart::Sregs) + 8 + 4 + 2 + 2;
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
    // The same in a version-1 blob.
    let mut v1 = v1_blob(&sample());
    v1[HEADER_LEN + REGS_LEN + 8 + 4 + 2 + 2] = 4;
    resign(&mut v1);
    assert!(matches!(err(&v1), VcpuStateError::Field { .. }));
}

#[test]
fn arbitrary_bytes_never_panic() {
    // A cheap deterministic spray of blobs of every length up to a bit
    // more than a minimal encoding, some with a valid header and table.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let template = minimal().to_bytes();
    for len in 0..2 * template.len() {
        let mut blob: Vec<u8> = (0..len).map(|_| rand() as u8).collect();
        assert!(VcpuState::from_bytes(&blob).is_err());
        if len >= HEADER_LEN {
            blob[..8].copy_from_slice(&MAGIC);
            blob[8..12].copy_from_slice(&VERSION.to_le_bytes());
            blob[12..16].copy_from_slice(&(1 + rand() % 11).to_le_bytes()[..4]);
            assert!(VcpuState::from_bytes(&blob).is_err());
        }
        // The template with random bytes spliced in, re-signed, so the
        // field checks run on garbage.
        if len < template.len() && len >= entry(2) {
            let mut t = template.clone();
            t[len] = rand() as u8;
            resign(&mut t);
            let _ = VcpuState::from_bytes(&t);
        }
    }
    // A full state with garbage bodies, re-signed: decodes or is refused,
    // never panics.
    let full = sample().to_bytes();
    let mut decoded = 0;
    for _ in 0..2000 {
        let mut t = full.clone();
        let at = entry(11) + (rand() as usize) % (full.len() - entry(11) - CHECKSUM_LEN);
        t[at] = rand() as u8;
        resign(&mut t);
        // Whatever decodes is a state that encodes and decodes to itself.
        if let Ok(st) = VcpuState::from_bytes(&t) {
            assert_eq!(VcpuState::from_bytes(&st.to_bytes()).as_ref(), Ok(&st));
            decoded += 1;
        }
    }
    assert!(
        decoded > 0,
        "no garbage body decoded; the spray tests nothing"
    );
}

#[test]
fn comparable_states_ignore_in_use_bits_of_components_in_their_initial_state() {
    // A standard-format XSAVE area: x87 at its initial values, XMM and
    // the upper YMM halves zero, MXCSR set.
    let mut area = vec![0u8; 1024];
    area[0..2].copy_from_slice(&[0x7f, 0x03]);
    area[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
    let with_bv = |bv: u64| {
        let mut a = area.clone();
        a[512..520].copy_from_slice(&bv.to_le_bytes());
        VcpuState {
            xsave: Some(a),
            ..VcpuState::default()
        }
    };
    // All three reported in use or none: the same registers.
    assert_eq!(with_bv(0b111).comparable(), with_bv(0).comparable());
    assert_ne!(with_bv(0b111), with_bv(0));
    // A bit this does not know (AVX-512's 5) stays.
    assert_ne!(with_bv(1 << 5).comparable(), with_bv(0).comparable());
    // A register that holds something keeps its component's bit.
    let mut used = with_bv(0b010);
    used.xsave.as_mut().unwrap()[160] = 1;
    let mut unused = used.clone();
    unused.xsave.as_mut().unwrap()[512] = 0;
    assert_ne!(used.clone().comparable(), unused.comparable());
    assert_eq!(used.clone().comparable(), used.comparable());
    // x87 out of its initial state (FCW 0x027F) keeps bit 0.
    let mut x87 = with_bv(0b001);
    x87.xsave.as_mut().unwrap()[1] = 0x02;
    let x87_bv = x87.comparable().xsave.unwrap()[512];
    assert_eq!(x87_bv, 1);
    // The TSC goes too.
    let mut a = with_bv(0);
    a.msrs.push(Msr {
        index: MSR_IA32_TSC,
        data: 5,
    });
    let mut b = with_bv(0);
    b.msrs.push(Msr {
        index: MSR_IA32_TSC,
        data: 9,
    });
    assert_eq!(a.comparable(), b.comparable());
}
