//! The KVM source: guest RAM mapped as a memslot, the CPL 3 increment
//! workload on a vCPU thread, and the VM's dirty log for the engine.

use crate::destination::StartGuest;
use crate::memory::{GuestRam, RAM_BLOCK};
use crate::options::{DirtyLog, MigrateOptions, Workload};
use crate::source::{self, Sent};
use crate::tracker;
use crate::workload::{Guest, HostWriter};
use ramblock_kvm::dirty::KvmDirtyLog;
use ramblock_kvm::guest::Workload as GuestWorkload;
use ramblock_kvm::memslot::BlockRange;
use ramblock_kvm::runner::VcpuRunner;
use ramblock_kvm::vcpu::Vcpu;
use ramblock_kvm::vcpu_state::VcpuState;
use ramblock_kvm::vm::{Vm, VmBuilder};
use ramblock_linux::transport::{Conn, Connector};
use std::sync::Arc;

/// A started KVM source.
pub struct Started {
    /// The VM.
    pub vm: Arc<Vm>,
    /// What writes guest RAM: the vCPU, or a host thread for the idle and
    /// random workloads (the vCPU then stays idle).
    pub guest: Box<dyn Guest>,
}

impl Started {
    /// The dirty-log mode in use.
    pub fn mode_name(&self, opts: &MigrateOptions) -> String {
        match opts.dirty_log {
            DirtyLog::UffdWp => "uffd-wp".into(),
            DirtyLog::Kvm(_) => self.vm.mode().to_string(),
        }
    }
}

/// The vCPU running the increment workload.
struct KvmGuest {
    runner: Option<VcpuRunner>,
}

impl Guest for KvmGuest {
    fn pause(&mut self) {
        if let Some(r) = &self.runner {
            r.pause();
        }
    }
    fn resume(&mut self) {
        if let Some(r) = &self.runner {
            r.resume();
        }
    }
    fn set_throttle(&mut self, percent: u8) {
        if let Some(r) = &self.runner {
            r.set_throttle(f64::from(percent.min(99)) / 100.0);
        }
    }
    fn progress(&self) -> u64 {
        self.runner.as_ref().map_or(0, |r| r.heartbeats())
    }
    fn failure(&self) -> Option<String> {
        self.runner.as_ref().and_then(|r| r.error())
    }
    fn save_state(&mut self) -> Vec<u8> {
        self.runner
            .as_ref()
            .and_then(|r| r.snapshot().ok())
            .map_or_else(Vec::new, |s| s.to_bytes())
    }
    fn stop(&mut self) {
        if let Some(r) = self.runner.take() {
            let _ = r.stop();
        }
    }
}

impl Drop for KvmGuest {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Maps `pc.ram` at guest-physical 0: through its guest_memfd when it has
/// one.
fn map_ram(
    vm: &Vm,
    block: &ramblock_core::block::RamBlock<
        ramblock_linux::LinuxMemory,
        ramblock_core::bitmap::Owned,
    >,
) -> Result<(), String> {
    let slot = if block
        .flags()
        .contains(ramblock_core::flags::BlockFlags::GUEST_MEMFD)
    {
        // SAFETY: the program's RAM lists are leaked ('static) and their
        // block is never removed, so the memory behind the slot (and its
        // guest_memfd) stays for the life of the VM.
        unsafe { vm.map_guest_memfd_block(block, 0, BlockRange::Whole) }
    } else {
        // SAFETY: as above.
        unsafe { vm.map_block(block, 0, BlockRange::Whole) }
    };
    slot.map(drop).map_err(|e| e.to_string())
}

/// Creates the VM, maps `pc.ram` at guest-physical 0 and starts the
/// workload.
pub fn start(ram: &'static GuestRam, opts: &MigrateOptions) -> Result<Started, String> {
    let vm = match crate::memory::take_vm(ram) {
        Some(vm) => vm,
        None => Arc::new(
            VmBuilder::new()
                .dirty_log(opts.dirty_log.kvm_request())
                .build()
                .map_err(|e| e.to_string())?,
        ),
    };
    let view = ram.read();
    let block = view.by_name(RAM_BLOCK).ok_or("no guest RAM block")?;
    map_ram(&vm, block)?;
    let guest: Box<dyn Guest> = match opts.workload {
        Workload::Increment => {
            let work = GuestWorkload::for_ram(block.used_length().0).map_err(|e| e.to_string())?;
            let vcpu = vm.create_vcpu(0).map_err(|e| e.to_string())?;
            work.load(&block.region(), &vcpu)
                .map_err(|e| e.to_string())?;
            let runner = VcpuRunner::spawn(vm.clone(), vcpu).map_err(|e| e.to_string())?;
            Box::new(KvmGuest {
                runner: Some(runner),
            })
        }
        Workload::Idle | Workload::Random(_) => Box::new(HostWriter::start(
            ram,
            opts.workload,
            opts.dirty_log == DirtyLog::UffdWp,
        )),
    };
    Ok(Started { vm, guest })
}

/// A destination VM over `ram`, made before the migration so that starting
/// the guest at the switch to post-copy only loads its registers. The
/// returned closure starts it from the source's device state (no vCPU for
/// an empty state: the source ran no vCPU program).
pub fn prepare_destination(ram: &'static GuestRam) -> Result<StartGuest, String> {
    let vm = match crate::memory::take_vm(ram) {
        Some(vm) => vm,
        None => Arc::new(
            VmBuilder::new()
                .dirty_log(crate::DESTINATION_LOG)
                .build()
                .map_err(|e| e.to_string())?,
        ),
    };
    {
        let view = ram.read();
        let block = view.by_name(RAM_BLOCK).ok_or("no guest RAM block")?;
        map_ram(&vm, block)?;
    }
    let mut vcpu = Some(vm.create_vcpu(0).map_err(|e| e.to_string())?);
    Ok(Box::new(move |state: &[u8]| {
        if state.is_empty() {
            return Ok(Box::new(KvmGuest { runner: None }) as Box<dyn Guest>);
        }
        resume_vcpu(&vm, &mut vcpu, state)
    }))
}

/// Starts the destination's one vCPU (`vcpu`, taken: a guest starts once)
/// from the shipped `cpu` section's bytes.
fn resume_vcpu(
    vm: &Arc<Vm>,
    vcpu: &mut Option<Vcpu>,
    state: &[u8],
) -> Result<Box<dyn Guest>, String> {
    let state = VcpuState::from_bytes(state).map_err(|e| e.to_string())?;
    let vcpu = vcpu
        .take()
        .ok_or("the destination guest was started already")?;
    vcpu.restore(&state).map_err(|e| e.to_string())?;
    let runner = VcpuRunner::spawn(vm.clone(), vcpu).map_err(|e| e.to_string())?;
    Ok(Box::new(KvmGuest {
        runner: Some(runner),
    }))
}

/// A local update's destination VM over `ram` (the source's memory, mapped
/// here): the memslot registered and, with `prefault`, KVM's mappings of
/// every workload page built by a spare vCPU running on the guest's own
/// page tables ([`GuestWorkload::prefault`]), while the source guest still
/// runs. Returns how to start the guest and how long the prefault took.
pub fn prepare_local(ram: &'static GuestRam, prefault: bool) -> Result<(StartGuest, u64), String> {
    let vm = Arc::new(
        VmBuilder::new()
            .dirty_log(crate::DESTINATION_LOG)
            .build()
            .map_err(|e| e.to_string())?,
    );
    let t0 = std::time::Instant::now();
    {
        let view = ram.read();
        let block = view.by_name(RAM_BLOCK).ok_or("no guest RAM block")?;
        map_ram(&vm, block)?;
        if prefault {
            let work = GuestWorkload::for_ram(block.used_length().0).map_err(|e| e.to_string())?;
            let mut spare = vm.create_vcpu(1).map_err(|e| e.to_string())?;
            work.prefault(&vm, &mut spare, &block.region())
                .map_err(|e| format!("prefaulting guest RAM: {e}"))?;
        }
    }
    let prefault_ns = if prefault {
        t0.elapsed().as_nanos() as u64
    } else {
        0
    };
    let mut vcpu = Some(vm.create_vcpu(0).map_err(|e| e.to_string())?);
    let start: StartGuest = Box::new(move |state: &[u8]| resume_vcpu(&vm, &mut vcpu, state));
    Ok((start, prefault_ns))
}

/// Where the increment workload resumes from `state` (its next page), for
/// checking a destination that ran on after post-copy.
pub fn resume_point(ram: &GuestRam, state: &[u8]) -> Result<(GuestWorkload, u64), String> {
    let len = ram
        .read()
        .by_name(RAM_BLOCK)
        .ok_or("no guest RAM block")?
        .used_length()
        .0;
    let work = GuestWorkload::for_ram(len).map_err(|e| e.to_string())?;
    let state = VcpuState::from_bytes(state).map_err(|e| e.to_string())?;
    let next = work.next_page_index(&state).map_err(|e| e.to_string())?;
    Ok((work, next))
}

/// Switches dirty logging on, migrates, and switches it off again whatever
/// the outcome.
pub fn send(
    vm: &Vm,
    ram: &GuestRam,
    guest: &mut dyn Guest,
    conn: Conn,
    connector: &Connector,
    opts: &MigrateOptions,
) -> Result<Sent, String> {
    if opts.dirty_log == DirtyLog::UffdWp {
        // KVM writes guest RAM through the memslot's userspace mapping, so
        // the write-protect tracker sees the vCPU's writes; KVM's own log
        // stays off.
        let mut log = tracker::uffd_wp_log(ram)?;
        return source::send(ram, &mut log, guest, conn, connector, opts);
    }
    let offset = ram
        .read()
        .by_name(RAM_BLOCK)
        .ok_or("no guest RAM block")?
        .offset();
    vm.set_block_logging(offset, true)
        .map_err(|e| e.to_string())?;
    let mut log = KvmDirtyLog::new(vm);
    let result = source::send(ram, &mut log, guest, conn, connector, opts);
    let off = vm.set_block_logging(offset, false);
    let stats = result?;
    off.map_err(|e| format!("migrated, but switching dirty logging off failed: {e}"))?;
    Ok(stats)
}
