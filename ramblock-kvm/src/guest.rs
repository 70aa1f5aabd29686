//! Minimal test guests: hand-assembled code, no firmware.
//!
//! - [`PageWriter`]: writes one byte to each page of a list, then does
//!   `out` to [`EXIT_PORT`]: straight-line 32-bit code without paging, one
//!   `mov byte [addr], imm8` per page. It starts directly at CPL 3 (segment
//!   state set with `KVM_SET_SREGS`, IOPL 3) and touches no stack. On PVM
//!   it runs in KVM's instruction emulator (no paging), which is fast
//!   enough for the tests that use it and keeps it simple.
//! - [`Workload`]: the migration workload, which must run at full speed.
//!   It runs at CPL 3 in 64-bit long mode with paging on (an identity map
//!   of the low 4 GiB in 2 MiB user pages; GDT with ring-3 segments; a TSS
//!   whose I/O bitmap allows its ports; IOPL 3) and loops forever
//!   incrementing one byte in every 4 KiB page from 1 MiB to the top of
//!   guest RAM (below the [`MMIO_HOLE`]), doing `out` to
//!   [`HEARTBEAT_PORT`] once per full pass. It uses no `hlt` or `int`,
//!   which some nested hosts refuse at CPL 3. PVM runs such code natively;
//!   the same loop without paging was emulated instruction by instruction
//!   (about 0.4 M pages a second, a hundredth of the native rate).
//!
//! For post-copy switch-over, [`Workload::next_page_index`] reads from a
//! saved [`VcpuState`] which page the loop writes next, and
//! [`check_resumed_increment`] verifies a destination that resumed the loop
//! from that state against the source's memory.
//!
//! Both enter CPL 3 through the vCPU's segment state (`KVM_SET_SREGS`), not
//! by an `iret` from CPL 0: on hosts where KVM's instruction emulator runs
//! CPL 0 code (shadow paging, such as PVM) a protected-mode `iret` or far
//! return to an outer privilege level is one the emulator does not
//! implement (`KVM_EXIT_INTERNAL_ERROR`). On hardware-virtualized KVM the
//! same state is what such an `iret` would produce, so the guest runs the
//! same either way and never relies on the emulator.

use crate::error::KvmError;
use crate::guest_error::GuestError;
use crate::vcpu::{Vcpu, VcpuEvent};
use crate::vcpu_state::VcpuState;
use crate::vm::Vm;
use kvm_bindings::{kvm_regs, kvm_segment};
use ramblock_core::addr::ByteLen;
use ramblock_core::region::HostRegion;

/// The port [`PageWriter`] programs write to when done.
pub const EXIT_PORT: u16 = 0x10;
/// The port [`PageWriter`] programs write to every [`YIELD_EVERY`] pages,
/// to give KVM a vCPU entry at which to check its dirty ring.
pub const YIELD_PORT: u16 = 0x12;
/// Stores between two [`YIELD_PORT`] exits: half of the 64 entries KVM
/// keeps in reserve past a ring's soft limit, so a ring-full exit always
/// comes before the ring overflows, even on hosts (like PVM) that handle
/// write faults without checking for a full ring.
pub const YIELD_EVERY: usize = 32;
/// The port [`Workload`] writes to after each full pass over its pages.
pub const HEARTBEAT_PORT: u16 = 0x11;
/// Where [`Workload`] starts writing: everything below holds its code and
/// tables.
pub const WORKLOAD_FIRST: u64 = 1 << 20;
/// Where x86 keeps the IOAPIC and local APIC (`0xFEE0_0000`): guest RAM
/// mapped there is shadowed by KVM's APIC page, so a write to it exits as
/// MMIO. The 32-bit test guest's workload stops below it.
pub const MMIO_HOLE: u64 = 0xFEC0_0000;

const PAGE: u64 = 4096;

/// A flat 4 GiB segment descriptor's fields.
#[derive(Copy, Clone)]
struct Seg {
    selector: u16,
    base: u32,
    limit: u32,
    /// Access byte: present, DPL, S, type.
    access: u8,
    /// Granularity, default size and long mode (the descriptor's high
    /// nibble: G, D/B, L, AVL).
    flags: u8,
}

impl Seg {
    const fn flat(selector: u16, access: u8) -> Seg {
        Seg {
            selector,
            base: 0,
            limit: 0xfffff,
            access,
            flags: 0xc,
        }
    }

    /// The 8-byte GDT descriptor.
    fn descriptor(self) -> u64 {
        let (base, limit) = (u64::from(self.base), u64::from(self.limit));
        (limit & 0xffff)
            | (base & 0xff_ffff) << 16
            | u64::from(self.access) << 40
            | (limit >> 16 & 0xf) << 48
            | u64::from(self.flags) << 52
            | (base >> 24 & 0xff) << 56
    }

    /// The same segment as KVM's hidden segment state.
    fn kvm(self) -> kvm_segment {
        let g = self.flags >> 3 & 1;
        kvm_segment {
            base: u64::from(self.base),
            limit: if g == 1 {
                self.limit << 12 | 0xfff
            } else {
                self.limit
            },
            selector: self.selector,
            type_: self.access & 0xf,
            present: self.access >> 7,
            dpl: self.access >> 5 & 3,
            db: self.flags >> 2 & 1,
            s: self.access >> 4 & 1,
            l: self.flags >> 1 & 1,
            g,
            avl: 0,
            unusable: 0,
            padding: 0,
        }
    }
}

// Accessed bits are preset so loading a segment never writes the GDT.
const CODE0: Seg = Seg::flat(0x08, 0x9b);
const DATA0: Seg = Seg::flat(0x10, 0x93);
const CODE3: Seg = Seg::flat(0x18 | 3, 0xfb);
const DATA3: Seg = Seg::flat(0x20 | 3, 0xf3);
const TSS: Seg = Seg {
    selector: 0x28,
    base: TSS_GPA as u32,
    limit: TSS_LEN - 1,
    access: 0x8b, // present, busy TSS (32-bit, or 64-bit in long mode)
    flags: 0,
};
/// Ring-3 64-bit code (L set, D clear), for the [`Workload`] in long mode.
/// It follows the TSS, whose descriptor takes two slots in long mode.
const CODE3_64: Seg = Seg {
    flags: 0xa,
    ..Seg::flat(0x38 | 3, 0xfb)
};
const GDT_LIMIT: u16 = 8 * 8 - 1;

/// Writes the GDT (null, ring-0 code/data, ring-3 code/data, TSS) and the
/// TSS into `low`, the host memory at guest-physical 0.
fn load_tables(low: &HostRegion<'_>) -> Result<(), GuestError> {
    // Low memory starts at guest-physical 0, so a GPA in it is its offset.
    let put = |gpa: u64, bytes: &[u8]| {
        low.write(ByteLen(gpa), bytes)
            .map_err(|e| GuestError::Layout(format!("low memory too small: {e}")))
    };
    // The TSS descriptor's upper half (long mode) is zero: its base is low.
    let gdt: Vec<u8> = [
        0,
        CODE0.descriptor(),
        DATA0.descriptor(),
        CODE3.descriptor(),
    ]
    .into_iter()
    .chain([
        DATA3.descriptor(),
        TSS.descriptor(),
        0,
        CODE3_64.descriptor(),
    ])
    .flat_map(u64::to_le_bytes)
    .collect();
    put(GDT_GPA, &gdt)?;
    let mut tss = [0u8; TSS_LEN as usize];
    tss[4..8].copy_from_slice(&KERNEL_STACK.to_le_bytes()); // esp0 (rsp0's low half)
    tss[8..10].copy_from_slice(&DATA0.selector.to_le_bytes()); // ss0 (32-bit)
                                                               // An I/O bitmap allowing exactly the guests' ports. IOPL 3 allows them
                                                               // too, but PVM checks the bitmap when it runs CPL 3 code natively.
    tss[102..104].copy_from_slice(&IO_BITMAP_OFFSET.to_le_bytes());
    let bitmap = &mut tss[IO_BITMAP_OFFSET as usize..];
    bitmap.fill(0xff);
    for port in [EXIT_PORT, HEARTBEAT_PORT, YIELD_PORT] {
        bitmap[usize::from(port / 8)] &= !(1 << (port % 8));
    }
    put(TSS_GPA, &tss)
}

/// Sets the descriptor tables and TSS `load_tables` wrote.
fn set_tables(s: &mut kvm_bindings::kvm_sregs) {
    s.gdt.base = GDT_GPA;
    s.gdt.limit = GDT_LIMIT;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.tr = TSS.kvm();
}

/// Puts the vCPU at CPL 3 at `rip` (flat ring-3 segments, IOPL 3,
/// interrupts off), without running any CPL 0 code: in 32-bit protected
/// mode without paging, or with `long_mode` in 64-bit long mode with paging
/// on the identity map [`write_identity_map`] built (the TSS's I/O bitmap
/// also allows `out`). PVM runs CPL 3 code natively only with paging on;
/// without it, every instruction goes through KVM's emulator (about 1.5 M
/// per second).
fn enter_user(vcpu: &Vcpu, rip: u64, long_mode: bool) -> Result<(), GuestError> {
    enter_flat32(vcpu, rip, |s| {
        set_tables(s);
        s.cs = CODE3.kvm();
        if long_mode {
            s.cr3 = PML4_GPA;
            s.cr4 |= CR4_PAE;
            s.cr0 |= CR0_PG;
            s.efer |= EFER_LME | EFER_LMA;
            s.cs = CODE3_64.kvm();
        }
        for seg in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss] {
            *seg = DATA3.kvm();
        }
    })?;
    let regs = kvm_regs {
        rip,
        rsp: u64::from(USER_STACK),
        rflags: 0x3002,
        ..Default::default()
    };
    vcpu.kvm_fd()
        .set_regs(&regs)
        .map_err(|e| KvmError::from_kvm(format!("KVM_SET_REGS (vCPU {})", vcpu.id()), e).into())
}

const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Writes 4-level page tables at [`PML4_GPA`] mapping guest-virtual
/// `0..4 GiB` to the same guest-physical addresses in 2 MiB user pages
/// (present, writable, user). They fill `PML4_GPA..PML4_GPA + 6 pages`,
/// below [`WORKLOAD_FIRST`], so the workload never writes them.
fn write_identity_map(low: &HostRegion<'_>) -> Result<(), GuestError> {
    const PRESENT_RW_USER: u64 = 0x7;
    const HUGE: u64 = 0x80;
    let pdpt = PML4_GPA + PAGE;
    let mut tables = vec![0u8; 6 * PAGE as usize];
    let mut entry = |table: u64, index: u64, value: u64| {
        let at = ((table - PML4_GPA) + index * 8) as usize;
        tables[at..at + 8].copy_from_slice(&value.to_le_bytes());
    };
    entry(PML4_GPA, 0, pdpt | PRESENT_RW_USER);
    for gib in 0..4 {
        let pd = pdpt + PAGE * (1 + gib);
        entry(pdpt, gib, pd | PRESENT_RW_USER);
        for i in 0..512 {
            entry(pd, i, (gib << 30 | i << 21) | HUGE | PRESENT_RW_USER);
        }
    }
    low.write(ByteLen(PML4_GPA), &tables)
        .map_err(|e| GuestError::Layout(format!("low memory too small: {e}")))
}

/// Puts the vCPU in 32-bit protected mode (no paging) at CPL 0 with flat
/// segments, at `rip`.
fn enter_flat32(
    vcpu: &Vcpu,
    rip: u64,
    extra: impl FnOnce(&mut kvm_bindings::kvm_sregs),
) -> Result<(), GuestError> {
    let id = vcpu.id();
    let mut sregs = vcpu
        .kvm_fd()
        .get_sregs()
        .map_err(|e| KvmError::from_kvm(format!("KVM_GET_SREGS (vCPU {id})"), e))?;
    sregs.cs = CODE0.kvm();
    for s in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        *s = DATA0.kvm();
    }
    sregs.cr0 = (sregs.cr0 | 1) & !(1 << 31); // PE on, PG off
    extra(&mut sregs);
    vcpu.kvm_fd()
        .set_sregs(&sregs)
        .map_err(|e| KvmError::from_kvm(format!("KVM_SET_SREGS (vCPU {id})"), e))?;
    let regs = kvm_regs {
        rip,
        rflags: 2,
        ..Default::default()
    };
    vcpu.kvm_fd()
        .set_regs(&regs)
        .map_err(|e| KvmError::from_kvm(format!("KVM_SET_REGS (vCPU {id})"), e).into())
}

/// The [`PageWriter`] program for `pages` (guest-physical addresses below
/// 4 GiB): `mov byte [page], value` for each, with `out YIELD_PORT, al`
/// after every [`YIELD_EVERY`] of them, then `out EXIT_PORT, al`.
pub fn page_writer_program(pages: &[u64], value: u8) -> Result<Vec<u8>, GuestError> {
    let mut code = Vec::with_capacity(pages.len() * 11 + 8);
    code.extend_from_slice(&[0xb0, value]); // mov al, value
    for (i, &gpa) in pages.iter().enumerate() {
        if i > 0 && i % YIELD_EVERY == 0 {
            code.extend_from_slice(&[0xe6, YIELD_PORT as u8]);
        }
        let addr = u32::try_from(gpa).map_err(|_| {
            GuestError::Layout(format!(
                "page {gpa:#x} is above 4 GiB; the 32-bit test guest cannot reach it"
            ))
        })?;
        code.extend_from_slice(&[0xc6, 0x05]);
        code.extend_from_slice(&addr.to_le_bytes());
        code.push(value);
    }
    code.extend_from_slice(&[0xe6, EXIT_PORT as u8, 0xeb, 0xfe]);
    Ok(code)
}

/// A vCPU that writes lists of pages on request; see the module docs.
#[derive(Debug)]
pub struct PageWriter<'a> {
    vcpu: Vcpu,
    low: HostRegion<'a>,
}

impl<'a> PageWriter<'a> {
    /// A writer on `vcpu` whose tables and program live in `low`, the host
    /// memory the VM maps at guest-physical 0 (at least
    /// [`PAGE_WRITER_CODE`] plus 10 bytes per page written). Loading them
    /// does not touch any dirty bitmap, and running them reads `low` only.
    pub fn new(vcpu: Vcpu, low: HostRegion<'a>) -> Result<PageWriter<'a>, GuestError> {
        load_tables(&low)?;
        Ok(PageWriter { vcpu, low })
    }

    /// The vCPU (for its ring-full count).
    pub fn vcpu(&self) -> &Vcpu {
        &self.vcpu
    }

    /// Runs a program that writes `value` to the first byte of each page in
    /// `pages` (guest-physical, below 4 GiB), until it reports done.
    pub fn write_pages(&mut self, vm: &Vm, pages: &[u64], value: u8) -> Result<(), GuestError> {
        let code = page_writer_program(pages, value)?;
        let room = self.low.len().saturating_sub(PAGE_WRITER_CODE as usize);
        if code.len() > room {
            return Err(GuestError::Layout(format!(
                "a program for {} pages needs {} bytes, low memory has {room} past {PAGE_WRITER_CODE:#x}",
                pages.len(),
                code.len(),
            )));
        }
        self.low
            .write(ByteLen(PAGE_WRITER_CODE), &code)
            .map_err(|e| GuestError::Layout(e.to_string()))?;
        enter_user(&self.vcpu, PAGE_WRITER_CODE, false)?;
        loop {
            match self.vcpu.run(vm)? {
                VcpuEvent::IoOut {
                    port: EXIT_PORT, ..
                } => return Ok(()),
                VcpuEvent::IoOut {
                    port: YIELD_PORT, ..
                }
                | VcpuEvent::Interrupted => continue,
                VcpuEvent::IoOut { port, data } => {
                    return Err(GuestError::UnexpectedPort {
                        vcpu: self.vcpu.id(),
                        who: "the page writer",
                        port,
                        data,
                    })
                }
            }
        }
    }
}

/// Where the [`Workload`]'s pieces live in the first 1 MiB.
const GDT_GPA: u64 = 0x1000;
const TSS_GPA: u64 = 0x2000;
const USER_CODE_GPA: u64 = 0x3000;
/// Where [`PageWriter`] puts its program (guest-physical).
pub const PAGE_WRITER_CODE: u64 = 0x4000;
const USER_STACK: u32 = 0x7000;
const KERNEL_STACK: u32 = 0x8000;
/// The [`Workload`]'s page tables: `0x9000..0xF000`.
const PML4_GPA: u64 = 0x9000;
// The workload never writes its own page tables.
const _: () = assert!(PML4_GPA + 6 * PAGE <= WORKLOAD_FIRST);
/// The TSS's I/O bitmap: ports 0..32, then the 0xFF byte that ends it.
const IO_BITMAP_OFFSET: u16 = 104;
const TSS_LEN: u32 = IO_BITMAP_OFFSET as u32 + 5;

// Where each instruction of [`Workload::user_code`] starts, from
// `USER_CODE_GPA` (cs has base 0, so `rip` is `USER_CODE_GPA` plus these).
const AT_MOV_EBX: u64 = 0;
const AT_MOV_ECX: u64 = 5;
const AT_INC: u64 = 10;
const AT_ADD: u64 = 12;
const AT_DEC: u64 = 18;
const AT_JNZ: u64 = 20;
const AT_OUT: u64 = 22;
const AT_JMP: u64 = 24;
/// Bytes of the workload's code.
const CODE_LEN: u64 = 26;
/// The zero flag in `rflags`.
const ZF: u64 = 1 << 6;

/// The CPL 3 page-touching loop; see the module docs.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// One past the last byte written (a page multiple, at most 4 GiB).
    pub top: u64,
}

impl Workload {
    /// The loop for a guest with `ram_len` bytes of RAM from address 0:
    /// every page from 1 MiB to the end of RAM or to the [`MMIO_HOLE`],
    /// whichever comes first (a 4 GiB guest's last 20 MiB are not written).
    pub fn for_ram(ram_len: u64) -> Result<Workload, GuestError> {
        Workload::new(ram_len.min(MMIO_HOLE))
    }

    /// A loop over every page in `WORKLOAD_FIRST..top`.
    pub fn new(top: u64) -> Result<Workload, GuestError> {
        if top <= WORKLOAD_FIRST || top > 1 << 32 || top % PAGE != 0 {
            return Err(GuestError::Layout(format!(
                "workload top {top:#x} must be a page multiple above 1 MiB and at most 4 GiB"
            )));
        }
        Ok(Workload { top })
    }

    /// Pages written per pass.
    pub fn pages(&self) -> u64 {
        (self.top - WORKLOAD_FIRST) / PAGE
    }

    /// Writes the GDT, TSS and code into `low`, the host memory behind
    /// guest-physical `0..1 MiB` (or more), and points `vcpu` at it, at CPL 3.
    pub fn load(&self, low: &HostRegion<'_>, vcpu: &Vcpu) -> Result<(), GuestError> {
        load_tables(low)?;
        write_identity_map(low)?;
        low.write(ByteLen(USER_CODE_GPA), &self.user_code())
            .map_err(|e| GuestError::Layout(format!("low memory too small: {e}")))?;
        enter_user(vcpu, USER_CODE_GPA, true)
    }

    /// Which page (0-based from [`WORKLOAD_FIRST`]) the loop increments
    /// next when resumed from `state`, a state of a vCPU running this
    /// workload: at the `inc`, the page `ebx` points at; at the `add`
    /// after it, the one after that; at the `dec` or `jnz`, the page `ebx`
    /// already points at; at `out`, `jmp` or the two `mov`s, page 0 (the
    /// next pass). A page one past the last means page 0. `rip` may be on
    /// the `out` or already past it: KVM may step over an `out` only when
    /// the vCPU next enters `KVM_RUN`.
    ///
    /// `ebx`, `ecx` and, at the `jnz`, the zero flag must be what the loop
    /// has at that `rip`; otherwise the prediction would not hold and the
    /// answer is [`GuestError::WorkloadState`], as for a `rip` outside the
    /// loop.
    pub fn next_page_index(&self, state: &VcpuState) -> Result<u64, GuestError> {
        let r = &state.regs;
        // 32-bit code: only the low halves are the guest's ebx and ecx.
        let (ebx, ecx) = (r.rbx & 0xffff_ffff, r.rcx & 0xffff_ffff);
        let pages = self.pages();
        let bad = |why: String| GuestError::WorkloadState {
            rip: r.rip,
            rbx: r.rbx,
            rcx: r.rcx,
            why,
        };
        // The page `ebx` points at, `pages` for one past the last.
        let index = |lowest: u64, highest: u64| {
            let (lo, hi) = (
                WORKLOAD_FIRST + lowest * PAGE,
                WORKLOAD_FIRST + highest * PAGE,
            );
            if ebx < lo || ebx > hi || ebx % PAGE != 0 {
                return Err(bad(format!(
                    "here ebx must be a page address in {lo:#x}..={hi:#x}"
                )));
            }
            Ok((ebx - WORKLOAD_FIRST) / PAGE)
        };
        let expect_ecx = |want: u64| {
            if ecx == want {
                Ok(())
            } else {
                Err(bad(format!("here ecx must be {want} (pages left)")))
            }
        };
        let at = r.rip.wrapping_sub(USER_CODE_GPA);
        match at {
            AT_MOV_EBX => Ok(0),
            AT_MOV_ECX => {
                index(0, 0)?;
                Ok(0)
            }
            AT_OUT | AT_JMP => {
                index(pages, pages)?;
                expect_ecx(0)?;
                Ok(0)
            }
            AT_INC | AT_ADD => {
                let i = index(0, pages - 1)?;
                expect_ecx(pages - i)?;
                Ok((i + u64::from(at == AT_ADD)) % pages)
            }
            AT_DEC | AT_JNZ => {
                // `add` has moved ebx on; `dec` has counted it at the `jnz`.
                let i = index(1, pages)?;
                let left = pages - i;
                if at == AT_DEC {
                    expect_ecx(left + 1)?;
                } else {
                    expect_ecx(left)?;
                    if (r.rflags & ZF != 0) != (left == 0) {
                        return Err(bad(format!(
                            "at the jnz the zero flag must be {} (ecx is {ecx})",
                            u8::from(left == 0)
                        )));
                    }
                }
                Ok(i % pages)
            }
            _ => Err(bad(format!(
                "rip is not the start of an instruction of the workload loop at \
                 {USER_CODE_GPA:#x}..{:#x}",
                USER_CODE_GPA + CODE_LEN
            ))),
        }
    }

    /// CPL 3, 64-bit: `for (;;) { for each page: inc byte [page]; out
    /// HEARTBEAT }`. 32-bit operations zero-extend, so rbx and rcx never
    /// hold more than their low halves.
    fn user_code(&self) -> Vec<u8> {
        let mut c = vec![0xbb]; // start: mov ebx, WORKLOAD_FIRST
        c.extend_from_slice(&(WORKLOAD_FIRST as u32).to_le_bytes());
        c.push(0xb9); // mov ecx, pages
        c.extend_from_slice(&(self.pages() as u32).to_le_bytes());
        // loop (offset 10): inc byte [rbx]; add ebx, 4096; dec ecx; jnz loop
        c.extend_from_slice(&[
            0xfe, 0x03, 0x81, 0xc3, 0x00, 0x10, 0x00, 0x00, 0xff, 0xc9, 0x75, 0xf4,
        ]);
        // out HEARTBEAT, al; jmp start
        c.extend_from_slice(&[0xe6, HEARTBEAT_PORT as u8, 0xeb, 0xe6]);
        c
    }
}

/// Where [`Workload::prefault`] puts its code: the page after the
/// workload's page tables, which the workload never reads or writes.
pub const PREFAULT_CODE: u64 = PML4_GPA + 6 * PAGE;
const _: () = assert!(PREFAULT_CODE + PAGE <= WORKLOAD_FIRST);

impl Workload {
    /// Builds `vm`'s mappings of every page the workload writes, before the
    /// workload's vCPU runs in `vm`, so that vCPU runs at full speed from
    /// its first instruction (the host has no `KVM_PRE_FAULT_MEMORY`).
    ///
    /// `vcpu` (a spare vCPU of `vm`, never used for the guest) runs a CPL 3
    /// loop on the workload's own paging state (the same page tables in
    /// guest memory, `cr3`, paging mode and CPL), doing `lock or byte
    /// [page], 0` on each page: an atomic read-modify-write of the value
    /// already there, so a guest writing the same memory from another VM
    /// meanwhile loses nothing. KVM builds writable mappings for each page,
    /// in its shadow page tables (reused by the workload's vCPU, which has
    /// the same `cr3` and role) or its TDP tables alike. The loop's code
    /// goes to [`PREFAULT_CODE`] in `low`; the workload's tables must be in
    /// place there already (the memory came from a running workload).
    pub fn prefault(
        &self,
        vm: &Vm,
        vcpu: &mut Vcpu,
        low: &HostRegion<'_>,
    ) -> Result<(), GuestError> {
        let mut c = vec![0xbb]; // mov ebx, WORKLOAD_FIRST
        c.extend_from_slice(&(WORKLOAD_FIRST as u32).to_le_bytes());
        c.push(0xb9); // mov ecx, pages
        c.extend_from_slice(&(self.pages() as u32).to_le_bytes());
        // loop: lock or byte [rbx], 0; add ebx, 4096; dec ecx; jnz loop
        c.extend_from_slice(&[
            0xf0, 0x80, 0x0b, 0x00, 0x81, 0xc3, 0x00, 0x10, 0x00, 0x00, 0xff, 0xc9, 0x75, 0xf2,
        ]);
        // done: out EXIT, al; jmp done
        c.extend_from_slice(&[0xe6, EXIT_PORT as u8, 0xeb, 0xfc]);
        low.write(ByteLen(PREFAULT_CODE), &c)
            .map_err(|e| GuestError::Layout(format!("low memory too small: {e}")))?;
        enter_user(vcpu, PREFAULT_CODE, true)?;
        loop {
            match vcpu.run(vm)? {
                VcpuEvent::IoOut {
                    port: EXIT_PORT, ..
                } => return Ok(()),
                VcpuEvent::Interrupted => continue,
                VcpuEvent::IoOut { port, data } => {
                    return Err(GuestError::UnexpectedPort {
                        vcpu: vcpu.id(),
                        who: "the prefault loop",
                        port,
                        data,
                    })
                }
            }
        }
    }
}

/// Where [`SseProgram`] lives (guest-physical): its code, the 16 xmm
/// values it loads, the 16 it stores, and the two TSC readings.
const SSE_CODE_GPA: u64 = PAGE_WRITER_CODE;
/// Where [`SseProgram`] reads the values it loads into xmm0..xmm15.
pub const SSE_INPUT: u64 = 0x5000;
/// Where [`SseProgram`] stores xmm0..xmm15 in its second phase.
pub const SSE_OUTPUT: u64 = 0x5100;
/// Where [`SseProgram`] stores its first TSC reading (then its second at
/// `+ 8`).
pub const SSE_TSC: u64 = 0x5200;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;

/// A CPL 3, 64-bit guest that uses SSE registers, for vCPU state round
/// trips. Phase one reads the TSC (stored at [`SSE_TSC`]), loads xmm0..15
/// from [`SSE_INPUT`] and does `out` to [`HEARTBEAT_PORT`]; phase two
/// (run after the vCPU was saved and restored, perhaps on another VM)
/// stores xmm0..15 to [`SSE_OUTPUT`], reads the TSC again (at
/// `SSE_TSC + 8`) and does `out` to [`EXIT_PORT`], then spins.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SseProgram {
    /// What xmm0..xmm15 are loaded with.
    pub values: [[u8; 16]; 16],
}

impl SseProgram {
    /// The program's code (64-bit, absolute 32-bit addresses).
    fn code() -> Vec<u8> {
        // mov dword [disp32], r32 (opcode 89 with SIB 0x25: no base).
        let store32 = |c: &mut Vec<u8>, reg: u8, at: u64| {
            c.extend_from_slice(&[0x89, reg << 3 | 4, 0x25]);
            c.extend_from_slice(&(at as u32).to_le_bytes());
        };
        // movdqu xmm<i>, [disp32] (F3 0F 6F) or movdqu [disp32], xmm<i>
        // (F3 0F 7F); xmm8..15 need REX.R.
        let movdqu = |c: &mut Vec<u8>, op: u8, i: u8, at: u64| {
            c.push(0xf3);
            if i >= 8 {
                c.push(0x44);
            }
            c.extend_from_slice(&[0x0f, op, (i & 7) << 3 | 4, 0x25]);
            c.extend_from_slice(&(at as u32).to_le_bytes());
        };
        let mut c = vec![0x0f, 0x31]; // rdtsc
        store32(&mut c, 0, SSE_TSC); // eax
        store32(&mut c, 2, SSE_TSC + 4); // edx
        for i in 0..16u8 {
            movdqu(&mut c, 0x6f, i, SSE_INPUT + 16 * u64::from(i));
        }
        c.extend_from_slice(&[0xe6, HEARTBEAT_PORT as u8]);
        for i in 0..16u8 {
            movdqu(&mut c, 0x7f, i, SSE_OUTPUT + 16 * u64::from(i));
        }
        c.extend_from_slice(&[0x0f, 0x31]);
        store32(&mut c, 0, SSE_TSC + 8);
        store32(&mut c, 2, SSE_TSC + 12);
        c.extend_from_slice(&[0xe6, EXIT_PORT as u8, 0xeb, 0xfe]);
        c
    }

    /// Writes the tables, page tables, code and input values into `low`
    /// (the host memory behind guest-physical `0..1 MiB` or more) and
    /// points `vcpu` at the program, at CPL 3 in long mode with SSE on
    /// (CR4.OSFXSR and OSXMMEXCPT).
    pub fn load(&self, low: &HostRegion<'_>, vcpu: &Vcpu) -> Result<(), GuestError> {
        let put = |gpa: u64, bytes: &[u8]| {
            low.write(ByteLen(gpa), bytes)
                .map_err(|e| GuestError::Layout(format!("low memory too small: {e}")))
        };
        load_tables(low)?;
        write_identity_map(low)?;
        put(SSE_CODE_GPA, &Self::code())?;
        put(SSE_INPUT, self.values.as_flattened())?;
        put(SSE_OUTPUT, &[0; 256])?;
        put(SSE_TSC, &[0; 16])?;
        enter_user(vcpu, SSE_CODE_GPA, true)?;
        let id = vcpu.id();
        let mut sregs = vcpu
            .kvm_fd()
            .get_sregs()
            .map_err(|e| KvmError::from_kvm(format!("KVM_GET_SREGS (vCPU {id})"), e))?;
        sregs.cr4 |= CR4_OSFXSR | CR4_OSXMMEXCPT;
        vcpu.kvm_fd()
            .set_sregs(&sregs)
            .map_err(|e| KvmError::from_kvm(format!("KVM_SET_SREGS (vCPU {id})"), e).into())
    }

    /// Runs `vcpu` until the program reaches the end of a phase: `out` to
    /// `port` ([`HEARTBEAT_PORT`] or [`EXIT_PORT`]).
    pub fn run_until(vm: &Vm, vcpu: &mut Vcpu, port: u16) -> Result<(), GuestError> {
        loop {
            match vcpu.run(vm)? {
                VcpuEvent::IoOut { port: p, .. } if p == port => return Ok(()),
                VcpuEvent::Interrupted => continue,
                VcpuEvent::IoOut { port, data } => {
                    return Err(GuestError::UnexpectedPort {
                        vcpu: vcpu.id(),
                        who: "the SSE program",
                        port,
                        data,
                    })
                }
            }
        }
    }

    /// What the program stored in `low` in its second phase: xmm0..xmm15.
    pub fn stored(low: &HostRegion<'_>) -> Result<[[u8; 16]; 16], GuestError> {
        let mut out = [[0u8; 16]; 16];
        low.read(ByteLen(SSE_OUTPUT), out.as_flattened_mut())
            .map_err(|e| GuestError::Layout(format!("low memory too small: {e}")))?;
        Ok(out)
    }

    /// The program's two TSC readings (before the save, after the
    /// restore); the second is 0 until phase two ran.
    pub fn tsc_readings(low: &HostRegion<'_>) -> Result<(u64, u64), GuestError> {
        let mut b = [0u8; 16];
        low.read(ByteLen(SSE_TSC), &mut b)
            .map_err(|e| GuestError::Layout(format!("low memory too small: {e}")))?;
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        Ok((word(0), word(8)))
    }
}

/// How far a destination got after resuming the [`Workload`]: it wrote
/// every page `full_passes` times, then `extra_pages` more pages from the
/// one it resumed at.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ResumedDelta {
    /// Full passes over all pages, modulo 256 (a page's first byte counts
    /// its writes in 8 bits).
    pub full_passes: u8,
    /// Pages written once more, a cyclic run from the page resumed at;
    /// always fewer than the workload's pages (a run over all of them is
    /// one more full pass).
    pub extra_pages: u64,
}

/// The increment [`check_resumed_increment`] expected on a page.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ExpectedDelta {
    /// Only this one (after the run of extra pages has ended).
    Exactly(u8),
    /// Either the run of extra pages goes on (`run`) or it ends here
    /// (`after_run`, one less).
    RunOrAfter {
        /// The increment of the pages in the run.
        run: u8,
        /// The increment of the pages after it.
        after_run: u8,
    },
}

impl std::fmt::Display for ExpectedDelta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedDelta::Exactly(d) => write!(f, "+{d}"),
            ExpectedDelta::RunOrAfter { run, after_run } => write!(
                f,
                "+{run} (the run of extra pages goes on) or +{after_run} (it ends here)"
            ),
        }
    }
}

/// How a destination's memory differs from what resuming the [`Workload`]
/// from the source's memory can produce. Pages are numbered from the start
/// of the regions (guest-physical page numbers when they are mapped at 0).
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResumeMismatch {
    /// The regions cannot be compared.
    #[error("source is {source_len:#x} bytes and destination {destination_len:#x}; both must be the same size, at least the workload's top {top:#x}")]
    Size {
        /// Bytes in the source region.
        source_len: u64,
        /// Bytes in the destination region.
        destination_len: u64,
        /// The workload's top.
        top: u64,
    },
    /// The page to resume at is not one of the workload's.
    #[error("next page {next_page} was given, but the workload has pages 0..{pages}; pass Workload::next_page_index of the state the destination resumed from")]
    NextPage {
        /// The page given.
        next_page: u64,
        /// The workload's pages.
        pages: u64,
    },
    /// A byte the workload never writes differs.
    #[error("page {page:#x}: byte {offset:#x} is {source_byte:#04x} in the source but {destination_byte:#04x} in the destination, and the workload never writes it; the copy or the destination's memory is wrong there")]
    Byte {
        /// The page holding it.
        page: u64,
        /// The byte's offset in the regions.
        offset: u64,
        /// The source's byte.
        source_byte: u8,
        /// The destination's byte.
        destination_byte: u8,
    },
    /// A workload page's first byte was not incremented as resuming the
    /// loop at `next_page` would have.
    #[error("page {page:#x}: first byte went from {source_byte:#04x} (source) to {destination_byte:#04x} (destination), +{found}, but {expected} was expected; the destination did not resume where the source stopped, or this page was lost or corrupted")]
    Increment {
        /// The first page (in the loop's order from `next_page`) that does
        /// not fit.
        page: u64,
        /// The source's first byte.
        source_byte: u8,
        /// The destination's first byte.
        destination_byte: u8,
        /// Their difference, modulo 256.
        found: u8,
        /// What would have fitted.
        expected: ExpectedDelta,
    },
}

/// Bytes compared per read: large enough that a 4 GiB check is a few
/// thousand reads, small enough to stay in cache.
const CHECK_CHUNK: usize = 1 << 20;

/// Checks `destination` against `source` after the destination, an exact
/// copy of the source, ran `workload` resumed at page `next_page`
/// ([`Workload::next_page_index`]): every byte outside the workload's pages
/// and every byte but the first of each of them is unchanged, and the
/// first bytes went up (modulo 256) by some `F + 1` on a cyclic run of
/// pages starting at `next_page` and by `F` on all the others.
///
/// Reads both regions once, 1 MiB at a time, and keeps two bytes per
/// workload page. Bytes outside the workload's pages are checked first, in
/// address order; then the increments, in the loop's order from
/// `next_page`, so the page reported is the first where the pattern
/// breaks.
pub fn check_resumed_increment(
    source: &HostRegion<'_>,
    destination: &HostRegion<'_>,
    workload: &Workload,
    next_page: u64,
) -> Result<ResumedDelta, ResumeMismatch> {
    let len = source.len() as u64;
    let size = ResumeMismatch::Size {
        source_len: len,
        destination_len: destination.len() as u64,
        top: workload.top,
    };
    if destination.len() as u64 != len || len < workload.top {
        return Err(size);
    }
    let pages = workload.pages();
    if next_page >= pages {
        return Err(ResumeMismatch::NextPage { next_page, pages });
    }
    // The (source, destination) first bytes of each workload page.
    let mut firsts: Vec<(u8, u8)> = Vec::with_capacity(pages as usize);
    let (mut src, mut dst) = (vec![0u8; CHECK_CHUNK], vec![0u8; CHECK_CHUNK]);
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(CHECK_CHUNK as u64) as usize;
        let (src, dst) = (&mut src[..n], &mut dst[..n]);
        source.read(ByteLen(at), src).map_err(|_| size)?;
        destination.read(ByteLen(at), dst).map_err(|_| size)?;
        // CHECK_CHUNK is a page multiple, so pages start at chunk offsets
        // that are page multiples too.
        let page_chunks = src.chunks(PAGE as usize).zip(dst.chunks(PAGE as usize));
        for (i, (s, d)) in page_chunks.enumerate() {
            let base = at + i as u64 * PAGE;
            let skip = match (s.first(), d.first()) {
                (Some(&s0), Some(&d0)) if (WORKLOAD_FIRST..workload.top).contains(&base) => {
                    firsts.push((s0, d0));
                    1
                }
                _ => 0,
            };
            let (s, d) = (s.get(skip..).unwrap_or(&[]), d.get(skip..).unwrap_or(&[]));
            if s != d {
                if let Some(k) = s.iter().zip(d).position(|(a, b)| a != b) {
                    let offset = base + (skip + k) as u64;
                    return Err(ResumeMismatch::Byte {
                        page: offset / PAGE,
                        offset,
                        source_byte: s[k],
                        destination_byte: d[k],
                    });
                }
            }
        }
        at += n as u64;
    }
    // The increments in the order the loop writes them from `next_page`:
    // `d0` (the run's, or everyone's if there is no run) for a while, then
    // `d0 - 1` for the rest.
    let first_page = WORKLOAD_FIRST / PAGE;
    let delta = |j: u64| {
        firsts
            .get(j as usize)
            .map(|&(s, d)| (s, d, d.wrapping_sub(s)))
    };
    let Some((_, _, d0)) = delta(next_page) else {
        return Err(size);
    };
    let after_run = d0.wrapping_sub(1);
    let mut run_end = None;
    for k in 1..pages {
        let j = (next_page + k) % pages;
        let Some((source_byte, destination_byte, found)) = delta(j) else {
            return Err(size);
        };
        let expected = match run_end {
            None if found == d0 => continue,
            None if found == after_run => {
                run_end = Some(k);
                continue;
            }
            None => ExpectedDelta::RunOrAfter { run: d0, after_run },
            Some(_) if found == after_run => continue,
            Some(_) => ExpectedDelta::Exactly(after_run),
        };
        return Err(ResumeMismatch::Increment {
            page: first_page + j,
            source_byte,
            destination_byte,
            found,
            expected,
        });
    }
    Ok(match run_end {
        None => ResumedDelta {
            full_passes: d0,
            extra_pages: 0,
        },
        Some(run) => ResumedDelta {
            full_passes: after_run,
            extra_pages: run,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_known_encodings() {
        assert_eq!(CODE0.descriptor(), 0x00cf_9b00_0000_ffff);
        assert_eq!(DATA3.descriptor(), 0x00cf_f300_0000_ffff);
        assert_eq!(TSS.descriptor(), 0x0000_8b00_2000_006c);
        let k = CODE3.kvm();
        assert_eq!(
            (k.limit, k.dpl, k.type_, k.db, k.l, k.g),
            (0xffff_ffff, 3, 0xb, 1, 0, 1)
        );
        // 64-bit code: L set, D clear.
        assert_eq!(CODE3_64.descriptor(), 0x00af_fb00_0000_ffff);
        let k = CODE3_64.kvm();
        assert_eq!((k.selector, k.dpl, k.db, k.l), (0x3b, 3, 0, 1));
    }

    #[test]
    fn the_identity_map_and_io_bitmap_say_what_the_guest_needs() {
        let mut low = vec![0u8; 1 << 20];
        let r = HostRegion::from_mut_slice(&mut low);
        write_identity_map(&r).unwrap();
        load_tables(&r).unwrap();
        let q = |gpa: u64| u64::from_le_bytes(low[gpa as usize..][..8].try_into().unwrap());
        // Walk the tables for a few addresses: each maps to itself.
        for va in [
            0u64,
            0x3000,
            WORKLOAD_FIRST,
            (1 << 30) + 0x20_0000,
            MMIO_HOLE - PAGE,
        ] {
            let pdpt = q(PML4_GPA) & !0xfff;
            let pd = q(pdpt + (va >> 30) * 8);
            assert_eq!(pd & 0x7, 0x7, "present, writable, user");
            let pde = q((pd & !0xfff) + (va >> 21 & 511) * 8);
            assert_eq!(pde & 0x87, 0x87, "a 2 MiB user page");
            assert_eq!((pde & !0x1f_ffff) | (va & 0x1f_ffff), va);
        }
        // The I/O bitmap lets exactly the guests' ports through.
        let bitmap = &low[(TSS_GPA + u64::from(IO_BITMAP_OFFSET)) as usize..][..5];
        for port in 0..32u16 {
            let allowed = bitmap[usize::from(port / 8)] >> (port % 8) & 1 == 0;
            assert_eq!(
                allowed,
                [EXIT_PORT, HEARTBEAT_PORT, YIELD_PORT].contains(&port),
                "port {port:#x}"
            );
        }
        assert_eq!(bitmap[4], 0xff, "the bitmap's end marker");
    }

    #[test]
    fn programs_encode_what_they_say() {
        let p = page_writer_program(&[0x1000, 0x20_3000], 7).unwrap();
        assert_eq!(&p[..9], &[0xb0, 7, 0xc6, 0x05, 0x00, 0x10, 0x00, 0x00, 7]);
        assert_eq!(&p[9..16], &[0xc6, 0x05, 0x00, 0x30, 0x20, 0x00, 7]);
        assert_eq!(&p[16..18], &[0xe6, EXIT_PORT as u8]);
        let long = page_writer_program(&[0; YIELD_EVERY + 1], 0).unwrap();
        let at = 2 + YIELD_EVERY * 7;
        assert_eq!(&long[at..at + 2], &[0xe6, YIELD_PORT as u8]);
        assert!(page_writer_program(&[1 << 32], 0).is_err());
        let w = Workload::new(3 << 20).unwrap();
        let u = w.user_code();
        assert_eq!(u.len(), 26);
        assert_eq!(u32::from_le_bytes(u[6..10].try_into().unwrap()), 512);
        // jnz back to offset 10, jmp back to 0.
        assert_eq!(22 + (u[21] as i8 as i64), 10);
        assert_eq!(26 + (u[25] as i8 as i64), 0);
        assert!(Workload::new(1 << 20).is_err());
        assert!(Workload::new((1 << 32) + 4096).is_err());
        // RAM reaching the APIC pages: the loop stops below the MMIO hole.
        assert_eq!(Workload::for_ram(1 << 32).unwrap().top, MMIO_HOLE);
        assert_eq!(Workload::for_ram(1 << 30).unwrap().top, 1 << 30);
    }

    #[test]
    fn the_sse_program_encodes_what_it_says() {
        let c = SseProgram::code();
        assert_eq!(&c[..2], &[0x0f, 0x31]);
        // mov [0x5200], eax
        assert_eq!(&c[2..9], &[0x89, 0x04, 0x25, 0x00, 0x52, 0x00, 0x00]);
        // movdqu xmm0, [0x5000]; movdqu xmm9, [0x5090]
        assert_eq!(
            &c[16..24],
            &[0xf3, 0x0f, 0x6f, 0x04, 0x25, 0x00, 0x50, 0x00]
        );
        let x9 = [0xf3, 0x44, 0x0f, 0x6f, 0x0c, 0x25, 0x90, 0x50, 0, 0];
        assert!(c.windows(10).any(|w| w == x9));
        // movdqu [0x51f0], xmm15
        let x15 = [0xf3, 0x44, 0x0f, 0x7f, 0x3c, 0x25, 0xf0, 0x51, 0, 0];
        assert!(c.windows(10).any(|w| w == x15));
        assert!(c.windows(2).any(|w| w == [0xe6, HEARTBEAT_PORT as u8]));
        assert_eq!(&c[c.len() - 4..], &[0xe6, EXIT_PORT as u8, 0xeb, 0xfe]);
        assert!(c.len() as u64 + SSE_CODE_GPA <= SSE_INPUT);
    }

    #[test]
    fn instruction_offsets_match_the_code() {
        let u = Workload::new(3 << 20).unwrap().user_code();
        assert_eq!(u.len() as u64, CODE_LEN);
        let opcode = |at: u64| u[at as usize];
        assert_eq!(opcode(AT_MOV_EBX), 0xbb);
        assert_eq!(opcode(AT_MOV_ECX), 0xb9);
        assert_eq!(&u[AT_INC as usize..][..2], &[0xfe, 0x03]);
        assert_eq!(&u[AT_ADD as usize..][..2], &[0x81, 0xc3]);
        assert_eq!(&u[AT_DEC as usize..][..2], &[0xff, 0xc9]);
        assert_eq!(opcode(AT_JNZ), 0x75);
        assert_eq!(opcode(AT_OUT), 0xe6);
        assert_eq!(opcode(AT_JMP), 0xeb);
    }

    /// A model CPU for the workload's eight instructions: runs one and
    /// returns the page index an `inc` wrote.
    fn step(w: &Workload, r: &mut kvm_regs) -> Option<u64> {
        let at = r.rip - USER_CODE_GPA;
        let mut next = at + 2;
        let mut wrote = None;
        match at {
            AT_MOV_EBX => (r.rbx, next) = (WORKLOAD_FIRST, AT_MOV_ECX),
            AT_MOV_ECX => (r.rcx, next) = (w.pages(), AT_INC),
            AT_INC => wrote = Some((r.rbx - WORKLOAD_FIRST) / PAGE),
            AT_ADD => (r.rbx, next) = (r.rbx + PAGE, AT_DEC),
            AT_DEC => {
                r.rcx -= 1;
                r.rflags = if r.rcx == 0 {
                    r.rflags | ZF
                } else {
                    r.rflags & !ZF
                };
                next = AT_JNZ;
            }
            AT_JNZ if r.rflags & ZF == 0 => next = AT_INC,
            AT_JNZ | AT_OUT => {}
            AT_JMP => next = AT_MOV_EBX,
            _ => panic!("model left the loop at {at}"),
        }
        r.rip = USER_CODE_GPA + next;
        wrote
    }

    fn state(regs: kvm_regs) -> VcpuState {
        VcpuState {
            regs,
            ..Default::default()
        }
    }

    #[test]
    fn next_page_index_predicts_the_model_cpu_at_every_instruction() {
        for pages in [1, 2, 5] {
            let w = Workload::new(WORKLOAD_FIRST + pages * PAGE).unwrap();
            // Fresh from `load`: rip at the start, ebx and ecx zero.
            let mut r = kvm_regs {
                rip: USER_CODE_GPA,
                rflags: 0x3002,
                ..Default::default()
            };
            for _ in 0..3 * (4 * pages + 4) {
                let predicted = w.next_page_index(&state(r));
                let mut ahead = r;
                let actual = std::iter::repeat_with(|| step(&w, &mut ahead))
                    .flatten()
                    .next();
                assert_eq!(predicted.ok(), actual, "{pages} pages, {r:x?}");
                step(&w, &mut r);
            }
        }
    }

    #[test]
    fn next_page_index_on_hand_made_states() {
        let w = Workload::new(WORKLOAD_FIRST + 4 * PAGE).unwrap();
        let at = |off: u64, ebx: u64, ecx: u64, zf: bool| {
            let regs = kvm_regs {
                rip: USER_CODE_GPA + off,
                // Junk in the upper halves: the guest is 32-bit.
                rbx: 0xdead_0000_0000_0000 | ebx,
                rcx: ecx,
                rflags: 0x3002 | if zf { ZF } else { 0 },
                ..Default::default()
            };
            w.next_page_index(&state(regs))
        };
        let page = |i: u64| WORKLOAD_FIRST + i * PAGE;
        assert_eq!(at(AT_INC, page(2), 2, false).unwrap(), 2);
        assert_eq!(at(AT_ADD, page(2), 2, false).unwrap(), 3);
        assert_eq!(at(AT_ADD, page(3), 1, false).unwrap(), 0);
        assert_eq!(at(AT_DEC, page(3), 2, false).unwrap(), 3);
        assert_eq!(at(AT_JNZ, page(3), 1, false).unwrap(), 3);
        // The last page: ebx has reached top.
        assert_eq!(at(AT_DEC, page(4), 1, false).unwrap(), 0);
        assert_eq!(at(AT_JNZ, page(4), 0, true).unwrap(), 0);
        // `out`, before or after KVM stepped over it.
        assert_eq!(at(AT_OUT, page(4), 0, true).unwrap(), 0);
        assert_eq!(at(AT_JMP, page(4), 0, true).unwrap(), 0);
        assert_eq!(at(AT_MOV_ECX, page(0), 0, true).unwrap(), 0);
        for (off, ebx, ecx, zf, why) in [
            (AT_INC + 1, page(0), 4, false, "mid-instruction"),
            (CODE_LEN, page(4), 0, true, "past the code"),
            (0, 0, 0, false, "below the code"),
            (AT_INC, page(4), 0, false, "inc at top"),
            (AT_INC, page(1) + 8, 3, false, "unaligned ebx"),
            (AT_INC, page(1), 4, false, "ecx off by one"),
            (AT_DEC, page(0), 4, false, "dec before any add"),
            (AT_JNZ, page(3), 1, true, "zero flag set with ecx 1"),
            (AT_JNZ, page(4), 0, false, "zero flag clear with ecx 0"),
            (AT_OUT, page(3), 0, true, "out before the last page"),
        ] {
            let off = if off == 0 {
                u64::MAX - USER_CODE_GPA
            } else {
                off
            };
            assert!(
                matches!(at(off, ebx, ecx, zf), Err(GuestError::WorkloadState { .. })),
                "{why}"
            );
        }
    }

    /// A region over a test's buffer.
    fn region(buf: &mut [u8]) -> HostRegion<'_> {
        HostRegion::from_mut_slice(buf)
    }

    #[test]
    fn checks_read_past_one_chunk() {
        // Pages on both sides of the first 1 MiB chunk boundary and a
        // region that does not end on a page: a byte in the last, partial
        // page is still compared.
        let w = Workload::new(WORKLOAD_FIRST + 3 * PAGE).unwrap();
        let len = w.top as usize + 100;
        let mut a = vec![7u8; len];
        let mut b = a.clone();
        for j in 0..3 {
            b[(WORKLOAD_FIRST + j * PAGE) as usize] += 2 + u8::from(j == 2);
        }
        let got = check_resumed_increment(&region(&mut a), &region(&mut b), &w, 2);
        assert_eq!(
            got,
            Ok(ResumedDelta {
                full_passes: 2,
                extra_pages: 1
            })
        );
        b[len - 1] = 0;
        assert!(matches!(
            check_resumed_increment(&region(&mut a), &region(&mut b), &w, 2),
            Err(ResumeMismatch::Byte { page, .. }) if page == w.top / PAGE
        ));
    }
}
