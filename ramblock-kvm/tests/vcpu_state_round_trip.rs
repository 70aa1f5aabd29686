//! A vCPU's whole state ([`VcpuState`]) survives save, encoding, decoding
//! and restore into a vCPU of a new VM: SSE registers a guest loaded and
//! uses after the move, MSRs, the local APIC, pending events, and a TSC
//! that does not go back. Restores that cannot work fail naming the part
//! or MSR.
//!
//! Each test prints `skipped: no /dev/kvm` without KVM.
mod common;

use common::*;
use kvm_bindings::{
    kvm_msr_entry, Msrs, KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SHADOW,
};
use ramblock_core::addr::ByteLen;
use ramblock_core::region::HostRegion;
use ramblock_kvm::guest::{SseProgram, EXIT_PORT, HEARTBEAT_PORT, SSE_INPUT};
use ramblock_kvm::mode::DirtyLogRequest;
use ramblock_kvm::vcpu::Vcpu;
use ramblock_kvm::vcpu_state::{Msr, VcpuPart, VcpuState};
use ramblock_kvm::vm::{Vm, VmBuilder};
use ramblock_kvm::KvmError;

const RAM: u64 = 2 << 20;
const MSR_IA32_TSC: u32 = 0x10;
const TSC_START: u64 = 1 << 50;

/// Distinct, non-zero bytes for each xmm register.
fn xmm_values() -> [[u8; 16]; 16] {
    let mut v = [[0u8; 16]; 16];
    for (i, reg) in v.iter_mut().enumerate() {
        for (j, b) in reg.iter_mut().enumerate() {
            *b = 0x11u8.wrapping_mul(i as u8 + 1) ^ (j as u8 * 7 + 1);
        }
    }
    v
}

fn snapshot_of(region: &HostRegion<'_>) -> Vec<u8> {
    let mut copy = vec![0u8; region.len()];
    region.read(ByteLen::ZERO, &mut copy).unwrap();
    copy
}

/// Ships `state` as bytes, as migration does.
fn ship(state: &VcpuState) -> VcpuState {
    VcpuState::from_bytes(&state.to_bytes()).unwrap()
}

#[test]
fn sse_registers_and_the_tsc_survive_a_move_to_a_new_vm() {
    if !kvm_or_skip() {
        return;
    }
    let list = List::new();
    let (vm_a, vm_b) = two_vms(&list, RAM);
    let (ram_a, ram_b) = (region(&list, "a.ram"), region(&list, "b.ram"));
    let program = SseProgram {
        values: xmm_values(),
    };
    let mut vcpu_a = vm_a.create_vcpu(0).unwrap();
    // The source guest's TSC starts far above any host's (2^50 cycles is
    // days at GHz rates), so a destination whose TSC was not restored
    // would read a smaller value.
    set_msrs(&vcpu_a, &[(MSR_IA32_TSC, TSC_START)]);
    program.load(&ram_a, &vcpu_a).unwrap();
    SseProgram::run_until(&vm_a, &mut vcpu_a, HEARTBEAT_PORT).unwrap();
    let state = vcpu_a.save().unwrap();
    println!(
        "saved: xsave {:?} bytes, fpu {}, {} MSRs, lapic {}, events {}, tsc {:?} kHz",
        state.xsave.as_ref().map(Vec::len),
        state.fpu.is_some(),
        state.msrs.len(),
        state.lapic.is_some(),
        state.events.is_some(),
        state.tsc_khz,
    );
    // The state itself holds the guest's registers.
    for (i, want) in xmm_values().iter().enumerate() {
        assert_eq!(state.xmm(i).as_ref(), Some(want), "saved xmm{i}");
    }
    let saved_tsc = state.msr(MSR_IA32_TSC).expect("IA32_TSC is saveable");
    let (tsc_before, _) = SseProgram::tsc_readings(&ram_a).unwrap();
    // Hosts without TSC offsetting (PVM: the guest reads the host's TSC
    // and KVM's IA32_TSC follows it) ignore the TSC set; there the
    // guest's TSC is the host's and only monotonicity can be checked.
    let offset_applies = saved_tsc >= TSC_START;
    if offset_applies {
        assert!(
            tsc_before >= TSC_START,
            "the guest did not run on the TSC set"
        );
        assert!(saved_tsc >= tsc_before, "{saved_tsc} < {tsc_before}");
    } else {
        println!(
            "note: this host ignores IA32_TSC writes (no TSC offsetting); \
             checking only that the TSC does not go back"
        );
    }

    // The destination: a copy of the source's memory without the input
    // values, so the guest can only have its registers from the state.
    ram_b.write(ByteLen::ZERO, &snapshot_of(&ram_a)).unwrap();
    ram_b.write(ByteLen(SSE_INPUT), &[0; 256]).unwrap();
    let mut vcpu_b = vm_b.create_vcpu(0).unwrap();
    let received = ship(&state);
    assert_eq!(received, state);
    vcpu_b.restore(&received).unwrap();
    SseProgram::run_until(&vm_b, &mut vcpu_b, EXIT_PORT).unwrap();
    assert_eq!(SseProgram::stored(&ram_b).unwrap(), xmm_values());
    // The TSC went on from where the source stopped, as KVM sees it and
    // as the guest does: not back to the new VM's start.
    let (before, after) = SseProgram::tsc_readings(&ram_b).unwrap();
    assert_eq!(before, tsc_before);
    let dest_tsc = vcpu_b.save().unwrap().msr(MSR_IA32_TSC).unwrap();
    println!(
        "TSC: guest read {tsc_before} before the save, {saved_tsc} saved, guest read \
         {after} after the restore, destination IA32_TSC {dest_tsc}"
    );
    assert!(
        dest_tsc >= saved_tsc,
        "IA32_TSC went back: {dest_tsc} < {saved_tsc}"
    );
    assert!(
        after >= tsc_before,
        "guest TSC went back: {after} < {tsc_before}"
    );
    if offset_applies {
        assert!(
            after >= saved_tsc,
            "guest TSC went back: {after} < {saved_tsc}"
        );
    }

    // An XSAVE area larger than this host's (a source with AMX, say) is
    // refused before anything is loaded, naming the part.
    if let Some(x) = &state.xsave {
        let mut big = state.clone();
        big.xsave = Some([x.as_slice(), &[0; 64 << 10]].concat());
        let vcpu_c = vm_b.create_vcpu(1).unwrap();
        match vcpu_c.restore(&big) {
            Err(KvmError::VcpuMismatch {
                part: VcpuPart::Xsave,
                vcpu: 1,
                ..
            }) => {}
            other => panic!("expected an XSAVE mismatch, got {other:?}"),
        }
    }
}

/// Writes `msrs` to `vcpu` the way a VMM sets up a guest.
fn set_msrs(vcpu: &Vcpu, msrs: &[(u32, u64)]) {
    let entries: Vec<kvm_msr_entry> = msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    // SAFETY: KVM_SET_MSRS reads only the kvm_msrs kvm-bindings built.
    let n = unsafe { vcpu.fd() }
        .set_msrs(&Msrs::from_entries(&entries).unwrap())
        .unwrap();
    assert_eq!(n, msrs.len());
}

#[test]
fn msrs_round_trip_and_a_refused_one_is_named() {
    if !kvm_or_skip() {
        return;
    }
    let vm_a = vm(DirtyLogRequest::Auto);
    let vm_b = vm(DirtyLogRequest::Auto);
    let mut vcpu_a = vm_a.create_vcpu(0).unwrap();
    // EFER.LME|SCE first would be needed for some; these are plain.
    let mut wanted = vec![
        (0x174, 0x10),                        // IA32_SYSENTER_CS
        (0x175, 0xffff_8000_1234_0000),       // IA32_SYSENTER_ESP
        (0x176, 0xffff_8000_5678_0000),       // IA32_SYSENTER_EIP
        (0xc000_0081, 0x0023_0010_0000_0000), // STAR
        (0xc000_0082, 0xffff_ffff_8100_0000), // LSTAR
        (0xc000_0084, 0x4_7700),              // SFMASK
        (0xc000_0102, 0xffff_8880_0000_0000), // KERNEL_GS_BASE
    ];
    set_msrs(&vcpu_a, &wanted);
    // TSC_AUX only if this host lets the vCPU have it.
    let tsc_aux = 0xc000_0103;
    let first = vcpu_a.save().unwrap();
    if first.msr(tsc_aux).is_some() {
        set_msrs(&vcpu_a, &[(tsc_aux, 3)]);
        wanted.push((tsc_aux, 3));
    } else {
        println!("TSC_AUX is not saveable here; not checked");
    }
    let state = vcpu_a.save().unwrap();
    for &(index, data) in &wanted {
        assert_eq!(state.msr(index), Some(data), "saved MSR {index:#x}");
    }
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut vcpu_b = vm_b.create_vcpu(0).unwrap();
    vcpu_b.restore(&ship(&state)).unwrap();
    let back = vcpu_b.save().unwrap();
    for &(index, data) in &wanted {
        assert_eq!(back.msr(index), Some(data), "restored MSR {index:#x}");
    }
    // Every MSR the source saved, the destination took and reads back
    // (values of clocks and counters move on; their presence is checked).
    let indices = |s: &VcpuState| s.msrs.iter().map(|m| m.index).collect::<Vec<_>>();
    assert_eq!(indices(&back), indices(&state));
    let tsc = |s: &VcpuState| s.msr(MSR_IA32_TSC).unwrap();
    assert!(
        tsc(&back) >= tsc(&state),
        "TSC went back across the restore"
    );

    // An MSR no x86 CPU has: refused, and named with its value.
    let mut bad = state.clone();
    bad.msrs.insert(
        3,
        Msr {
            index: 0x4b56_0bad,
            data: 42,
        },
    );
    let vcpu_c = vm_b.create_vcpu(1).unwrap();
    match vcpu_c.restore(&bad) {
        Err(KvmError::Msr {
            index: 0x4b56_0bad,
            data: 42,
            vcpu: 1,
            ..
        }) => {}
        other => panic!("expected the bogus MSR to be named, got {other:?}"),
    }
}

/// A VM with an in-kernel irqchip, or `None` (printing why) when the host
/// refuses one.
fn irqchip_vm() -> Option<Vm> {
    match VmBuilder::new().irqchip(true).build() {
        Ok(vm) => Some(vm),
        Err(e) => {
            println!("skipped: no in-kernel irqchip ({e})");
            None
        }
    }
}

/// A local APIC register (32 bits at `offset` in the register page).
fn apic_reg(lapic: &kvm_bindings::kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_apic_reg(lapic: &mut kvm_bindings::kvm_lapic_state, offset: usize, v: u32) {
    for (d, s) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(v.to_le_bytes())
    {
        *d = s as std::os::raw::c_char;
    }
}

#[test]
fn the_local_apic_and_pending_events_round_trip() {
    if !kvm_or_skip() {
        return;
    }
    let (Some(vm_a), Some(vm_b)) = (irqchip_vm(), irqchip_vm()) else {
        return;
    };
    let mut vcpu_a = vm_a.create_vcpu(0).unwrap();
    // SAFETY: these calls pass kvm-ioctls only structs it owns.
    let fd = unsafe { vcpu_a.fd() };
    let mut lapic = fd.get_lapic().unwrap();
    const TPR: usize = 0x80;
    const SVR: usize = 0xf0;
    const LVT_TIMER: usize = 0x320;
    const LVT_LINT0: usize = 0x350;
    const TDCR: usize = 0x3e0;
    let regs = [
        (TPR, 0x20),
        (SVR, 0x1ff),
        (LVT_TIMER, 0x0001_00ec),
        (LVT_LINT0, 0x0000_0700),
        (TDCR, 0x3),
    ];
    for (off, v) in regs {
        set_apic_reg(&mut lapic, off, v);
    }
    fd.set_lapic(&lapic).unwrap();
    let mut events = fd.get_vcpu_events().unwrap();
    events.nmi.pending = 1;
    events.interrupt.shadow = 1;
    events.flags = KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SHADOW;
    fd.set_vcpu_events(&events).unwrap();

    let state = vcpu_a.save().unwrap();
    let saved = state.lapic.expect("an irqchip VM's state has its LAPIC");
    for (off, v) in regs {
        assert_eq!(apic_reg(&saved, off), v, "saved APIC register {off:#x}");
    }
    let e = state.events.expect("vCPU events are saveable");
    assert_eq!((e.nmi.pending, e.interrupt.shadow), (1, 1));

    let vcpu_b = vm_b.create_vcpu(0).unwrap();
    vcpu_b.restore(&ship(&state)).unwrap();
    // SAFETY: as above.
    let fd_b = unsafe { vcpu_b.fd() };
    let back = fd_b.get_lapic().unwrap();
    for (off, v) in regs {
        assert_eq!(apic_reg(&back, off), v, "restored APIC register {off:#x}");
    }
    let e = fd_b.get_vcpu_events().unwrap();
    assert_eq!(
        (e.nmi.pending, e.interrupt.shadow),
        (1, 1),
        "restored events {e:?}"
    );
    assert_eq!(fd_b.get_mp_state().unwrap(), state.mp_state.unwrap());

    // The same state into a VM without an irqchip: refused, naming the
    // LAPIC.
    let plain = vm(DirtyLogRequest::Auto);
    let vcpu_c = plain.create_vcpu(0).unwrap();
    match vcpu_c.restore(&state) {
        Err(KvmError::VcpuMismatch {
            part: VcpuPart::Lapic,
            vcpu: 0,
            ..
        }) => {}
        other => panic!("expected a LAPIC error, got {other:?}"),
    }
}
