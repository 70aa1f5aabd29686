//! Minimal test guests: hand-assembled 32-bit protected-mode code, no
//! firmware, no paging.
//!
//! - [`PageWriter`]: writes one byte to each page of a list, then does
//!   `out` to [`EXIT_PORT`]: straight-line code, one 10-byte
//!   `mov byte [addr], imm8` per page. It starts directly at CPL 3 (segment
//!   state set with `KVM_SET_SREGS`, IOPL 3), so it touches no stack and
//!   runs natively even where KVM emulates CPL 0: on such a host an emulated
//!   store loop can outrun the dirty ring's full check and overflow it
//!   (the kernel warns "should never get full" and drops entries).
//! - [`Workload`]: runs at CPL 3 (GDT with ring-3 code and data segments,
//!   a TSS, IOPL 3 so `out` is allowed there) and loops forever
//!   incrementing one byte in every 4 KiB page from 1 MiB to the top of
//!   guest RAM, doing `out` to [`HEARTBEAT_PORT`] once per full pass. It
//!   uses no `hlt` or `int`, which some nested hosts refuse at CPL 3.
//!
//! Both enter CPL 3 through the vCPU's segment state (`KVM_SET_SREGS`), not
//! by an `iret` from CPL 0: on hosts where KVM's instruction emulator runs
//! CPL 0 code (shadow paging, such as PVM) a protected-mode `iret` or far
//! return to an outer privilege level is one the emulator does not
//! implement (`KVM_EXIT_INTERNAL_ERROR`). On hardware-virtualized KVM the
//! same state is what such an `iret` would produce, so the guest runs the
//! same either way and never relies on the emulator.

use crate::error::KvmError;
use crate::vcpu::{Vcpu, VcpuEvent};
use crate::vm::Vm;
use kvm_bindings::{kvm_regs, kvm_segment};
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

const PAGE: u64 = 4096;

/// A flat 4 GiB segment descriptor's fields.
#[derive(Copy, Clone)]
struct Seg {
    selector: u16,
    base: u32,
    limit: u32,
    /// Access byte: present, DPL, S, type.
    access: u8,
    /// Granularity and default size (the descriptor's high nibble).
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
            l: 0,
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
    access: 0x8b, // present, 32-bit TSS, busy
    flags: 0,
};
const GDT: [Seg; 5] = [CODE0, DATA0, CODE3, DATA3, TSS];
const GDT_LIMIT: u16 = 6 * 8 - 1;

/// Writes the GDT (null, ring-0 code/data, ring-3 code/data, TSS) and the
/// TSS into `low`, the host memory at guest-physical 0.
fn load_tables(low: &HostRegion) -> Result<(), KvmError> {
    let put = |gpa: u64, bytes: &[u8]| {
        low.write(gpa, bytes)
            .map_err(|e| KvmError::GuestLayout(format!("low memory too small: {e}")))
    };
    let gdt: Vec<u8> = std::iter::once(0)
        .chain(GDT.iter().map(|s| s.descriptor()))
        .flat_map(u64::to_le_bytes)
        .collect();
    put(GDT_GPA, &gdt)?;
    let mut tss = [0u8; TSS_LEN as usize];
    tss[4..8].copy_from_slice(&KERNEL_STACK.to_le_bytes()); // esp0
    tss[8..10].copy_from_slice(&DATA0.selector.to_le_bytes()); // ss0
    tss[102..104].copy_from_slice(&(TSS_LEN as u16).to_le_bytes()); // no I/O bitmap
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

/// Puts the vCPU at CPL 3 in 32-bit protected mode (flat ring-3 segments,
/// IOPL 3, interrupts off) at `rip`, without running any CPL 0 code.
fn enter_user32(vcpu: &Vcpu, rip: u64) -> Result<(), KvmError> {
    enter_flat32(vcpu, rip, |s| {
        set_tables(s);
        s.cs = CODE3.kvm();
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
    vcpu.fd()
        .set_regs(&regs)
        .map_err(|e| KvmError::from_kvm(format!("KVM_SET_REGS (vCPU {})", vcpu.id()), e))
}

/// Puts the vCPU in 32-bit protected mode (no paging) at CPL 0 with flat
/// segments, at `rip`.
fn enter_flat32(
    vcpu: &Vcpu,
    rip: u64,
    extra: impl FnOnce(&mut kvm_bindings::kvm_sregs),
) -> Result<(), KvmError> {
    let id = vcpu.id();
    let mut sregs = vcpu
        .fd()
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
    vcpu.fd()
        .set_sregs(&sregs)
        .map_err(|e| KvmError::from_kvm(format!("KVM_SET_SREGS (vCPU {id})"), e))?;
    let regs = kvm_regs {
        rip,
        rflags: 2,
        ..Default::default()
    };
    vcpu.fd()
        .set_regs(&regs)
        .map_err(|e| KvmError::from_kvm(format!("KVM_SET_REGS (vCPU {id})"), e))
}

/// The [`PageWriter`] program for `pages` (guest-physical addresses below
/// 4 GiB): `mov byte [page], value` for each, with `out YIELD_PORT, al`
/// after every [`YIELD_EVERY`] of them, then `out EXIT_PORT, al`.
pub fn page_writer_program(pages: &[u64], value: u8) -> Result<Vec<u8>, KvmError> {
    let mut code = Vec::with_capacity(pages.len() * 11 + 8);
    code.extend_from_slice(&[0xb0, value]); // mov al, value
    for (i, &gpa) in pages.iter().enumerate() {
        if i > 0 && i % YIELD_EVERY == 0 {
            code.extend_from_slice(&[0xe6, YIELD_PORT as u8]);
        }
        let addr = u32::try_from(gpa).map_err(|_| {
            KvmError::GuestLayout(format!(
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
pub struct PageWriter {
    vcpu: Vcpu,
    low: HostRegion,
}

impl PageWriter {
    /// A writer on `vcpu` whose tables and program live in `low`, the host
    /// memory the VM maps at guest-physical 0 (at least
    /// [`PAGE_WRITER_CODE`] plus 10 bytes per page written). Loading them
    /// does not touch any dirty bitmap, and running them reads `low` only.
    pub fn new(vcpu: Vcpu, low: HostRegion) -> Result<PageWriter, KvmError> {
        load_tables(&low)?;
        Ok(PageWriter { vcpu, low })
    }

    /// The vCPU (for its ring-full count).
    pub fn vcpu(&self) -> &Vcpu {
        &self.vcpu
    }

    /// Runs a program that writes `value` to the first byte of each page in
    /// `pages` (guest-physical, below 4 GiB), until it reports done.
    pub fn write_pages(&mut self, vm: &Vm, pages: &[u64], value: u8) -> Result<(), KvmError> {
        let code = page_writer_program(pages, value)?;
        let room = self.low.len().saturating_sub(PAGE_WRITER_CODE as usize);
        if code.len() > room {
            return Err(KvmError::GuestLayout(format!(
                "a program for {} pages needs {} bytes, low memory has {room} past {PAGE_WRITER_CODE:#x}",
                pages.len(),
                code.len(),
            )));
        }
        self.low
            .write(PAGE_WRITER_CODE, &code)
            .map_err(|e| KvmError::GuestLayout(e.to_string()))?;
        enter_user32(&self.vcpu, PAGE_WRITER_CODE)?;
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
                    return Err(KvmError::Guest {
                        vcpu: self.vcpu.id(),
                        what: format!("page writer wrote {data:#x} to unexpected port {port:#x}"),
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
const TSS_LEN: u32 = 104;

/// The CPL 3 page-touching loop; see the module docs.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// One past the last byte written (a page multiple, at most 4 GiB).
    pub top: u64,
}

impl Workload {
    /// A loop over every page in `WORKLOAD_FIRST..top`.
    pub fn new(top: u64) -> Result<Workload, KvmError> {
        if top <= WORKLOAD_FIRST || top > 1 << 32 || top % PAGE != 0 {
            return Err(KvmError::GuestLayout(format!(
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
    pub fn load(&self, low: &HostRegion, vcpu: &Vcpu) -> Result<(), KvmError> {
        load_tables(low)?;
        low.write(USER_CODE_GPA, &self.user_code())
            .map_err(|e| KvmError::GuestLayout(format!("low memory too small: {e}")))?;
        enter_user32(vcpu, USER_CODE_GPA)
    }

    /// CPL 3: `for (;;) { for each page: inc byte [page]; out HEARTBEAT }`.
    fn user_code(&self) -> Vec<u8> {
        let mut c = vec![0xbb]; // start: mov ebx, WORKLOAD_FIRST
        c.extend_from_slice(&(WORKLOAD_FIRST as u32).to_le_bytes());
        c.push(0xb9); // mov ecx, pages
        c.extend_from_slice(&(self.pages() as u32).to_le_bytes());
        // loop (offset 10): inc byte [ebx]; add ebx, 4096; dec ecx; jnz loop
        c.extend_from_slice(&[
            0xfe, 0x03, 0x81, 0xc3, 0x00, 0x10, 0x00, 0x00, 0x49, 0x75, 0xf5,
        ]);
        // out HEARTBEAT, al; jmp start
        c.extend_from_slice(&[0xe6, HEARTBEAT_PORT as u8, 0xeb, 0xe7]);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_known_encodings() {
        assert_eq!(CODE0.descriptor(), 0x00cf_9b00_0000_ffff);
        assert_eq!(DATA3.descriptor(), 0x00cf_f300_0000_ffff);
        assert_eq!(TSS.descriptor(), 0x0000_8b00_2000_0067);
        let k = CODE3.kvm();
        assert_eq!(
            (k.limit, k.dpl, k.type_, k.db, k.g),
            (0xffff_ffff, 3, 0xb, 1, 1)
        );
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
        assert_eq!(u.len(), 25);
        assert_eq!(u32::from_le_bytes(u[6..10].try_into().unwrap()), 512);
        // jnz back to offset 10, jmp back to 0.
        assert_eq!(21 + (u[20] as i8 as i64), 10);
        assert_eq!(25 + (u[24] as i8 as i64), 0);
        assert!(Workload::new(1 << 20).is_err());
        assert!(Workload::new((1 << 32) + 4096).is_err());
    }
}
