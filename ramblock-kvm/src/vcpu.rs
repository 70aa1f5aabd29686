//! [`Vcpu`]: one virtual CPU, run until it does something the VMM must see.

use crate::error::KvmError;
use crate::vcpu_state::{Msr, VcpuPart, VcpuState, MAX_MSRS, MAX_XSAVE_LEN};
use crate::vm::Vm;
use kvm_bindings::{
    kvm_msr_entry, Msrs, Xsave, KVM_EXIT_DIRTY_RING_FULL, KVM_MAX_MSR_ENTRIES,
    KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SIPI_VECTOR,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use kvm_ioctls::{VcpuExit, VcpuFd};
use nix::errno::Errno;

/// Why [`Vcpu::run`] returned.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The guest wrote `data` (its first byte) to I/O port `port`.
    IoOut {
        /// The port.
        port: u16,
        /// The first byte written.
        data: u8,
    },
    /// `KVM_RUN` was interrupted by a signal or `immediate_exit`.
    Interrupted,
}

/// `IA32_TSC_DEADLINE`: restored after the local APIC (see
/// [`Vcpu::restore`]).
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// MSRs that belong to KVM's in-kernel local APIC: `IA32_TSC_DEADLINE`,
/// `MSR_KVM_PV_EOI_EN`, `MSR_KVM_ASYNC_PF_INT` and `MSR_KVM_ASYNC_PF_ACK`.
const LAPIC_MSRS: [u32; 4] = [MSR_IA32_TSC_DEADLINE, 0x4b56_4d04, 0x4b56_4d06, 0x4b56_4d07];

/// MSRs per `KVM_GET_MSRS`/`KVM_SET_MSRS` (the kernel's and kvm-bindings'
/// limit).
const MSR_CHUNK: usize = KVM_MAX_MSR_ENTRIES;

/// What a vCPU's state holds on this host: probed once per vCPU.
#[derive(Clone, Debug, Default)]
pub(crate) struct StateCaps {
    /// Bytes of the XSAVE area (`KVM_CAP_XSAVE2`), or `None` to use
    /// `KVM_GET_FPU`.
    xsave_len: Option<usize>,
    xcrs: bool,
    vcpu_events: bool,
    debugregs: bool,
    tsc_khz: bool,
    /// `KVM_GET_MSR_INDEX_LIST`, at most [`MAX_MSRS`].
    msrs: Vec<u32>,
}

impl StateCaps {
    /// Probes `vm` (and `kvm` for the MSR list).
    pub(crate) fn probe(kvm: &Kvm, vm: &VmFd) -> Result<StateCaps, KvmError> {
        let xsave2 = vm.check_extension_int(Cap::Xsave2);
        let xsave_len = (xsave2 > 0 && vm.check_extension(Cap::Xsave))
            .then(|| (xsave2 as usize).clamp(crate::vcpu_state::MIN_XSAVE_LEN, MAX_XSAVE_LEN));
        let list = kvm
            .get_msr_index_list()
            .map_err(|e| KvmError::from_kvm("KVM_GET_MSR_INDEX_LIST", e))?;
        let mut msrs = list.as_slice().to_vec();
        msrs.truncate(MAX_MSRS);
        Ok(StateCaps {
            xsave_len,
            xcrs: vm.check_extension(Cap::Xcrs),
            vcpu_events: vm.check_extension(Cap::VcpuEvents),
            debugregs: vm.check_extension_raw(kvm_bindings::KVM_CAP_DEBUGREGS.into()) > 0,
            tsc_khz: vm.check_extension(Cap::GetTscKhz),
            msrs,
        })
    }
}

/// A zeroed `kvm_xsave2` of `len` bytes (header and FAM).
fn xsave_buffer(vcpu: u64, len: usize) -> Result<Xsave, KvmError> {
    let header = std::mem::size_of::<kvm_bindings::kvm_xsave>();
    let fam = len.saturating_sub(header).div_ceil(4);
    Xsave::new(fam).map_err(|_| KvmError::VcpuMismatch {
        vcpu,
        part: VcpuPart::Xsave,
        why: format!("cannot allocate an XSAVE buffer of {len} bytes"),
    })
}

/// A vCPU of a [`Vm`].
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    id: u64,
    ring_full_exits: u64,
    caps: StateCaps,
}

impl Vcpu {
    pub(crate) fn new(fd: VcpuFd, id: u64, caps: StateCaps) -> Vcpu {
        Vcpu {
            fd,
            id,
            ring_full_exits: 0,
            caps,
        }
    }

    /// The vCPU id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The kvm-ioctls vCPU fd, for register setup.
    ///
    /// # Safety
    /// Some of kvm-ioctls' safe `VcpuFd` calls pass the kernel addresses
    /// taken from their arguments unchecked (`enable_cap`'s `args`, for
    /// capabilities whose argument is a user pointer), and the dirty ring
    /// mapped for this vCPU must not be re-sized behind ramblock: the
    /// caller makes only calls whose pointers are valid for what the kernel
    /// does with them, and no call that changes the ring.
    pub unsafe fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The kvm-ioctls vCPU fd, mutably (`kvm_run` access).
    ///
    /// # Safety
    /// As for [`Vcpu::fd`].
    pub unsafe fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// [`Vcpu::fd`] for this crate's own calls, which keep its rules.
    #[cfg(feature = "test-guest")]
    pub(crate) fn kvm_fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// [`Vcpu::fd_mut`] for this crate's own calls.
    #[cfg(feature = "test-guest")]
    pub(crate) fn kvm_fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// How many times the dirty ring filled up and was drained.
    pub fn ring_full_exits(&self) -> u64 {
        self.ring_full_exits
    }

    /// The vCPU's whole state ([`VcpuState`]), for migration and
    /// snapshots. It must not be running (its thread is paused or it is
    /// not in `KVM_RUN`), and with several vCPUs all of them must be
    /// stopped, as KVM requires for `KVM_GET_VCPU_EVENTS`.
    ///
    /// KVM may finish an I/O exit (for `out`: step `rip` past it) only on
    /// the next `KVM_RUN`, keeping that pending step where `KVM_GET_REGS`
    /// does not show it (hosts that emulate the `out` have stepped already).
    /// So this first enters `KVM_RUN` with `immediate_exit` set, which
    /// completes a pending step and returns `EINTR` without running a guest
    /// instruction (the KVM API's documented way to make the state
    /// consistent before migrating). Kernels that check `immediate_exit`
    /// first leave `rip` on the `out`, which then runs again on the
    /// destination.
    ///
    /// Then, in this order: `KVM_GET_MP_STATE` first (it delivers pending
    /// INIT/SIPI into the registers read after it), regs, sregs, the XSAVE
    /// area (`KVM_GET_XSAVE2`, sized by `KVM_CAP_XSAVE2`; `KVM_GET_FPU` on
    /// hosts without it), XCRs, the local APIC (absent without an in-kernel
    /// irqchip), every MSR `KVM_GET_MSR_INDEX_LIST` names, the pending
    /// events, the debug registers and the TSC frequency. Without an
    /// in-kernel local APIC, the MSRs that belong to it are left out. An
    /// MSR KVM lists
    /// but will not read for this vCPU (a feature its CPUID lacks) is left
    /// out, as QEMU and Cloud Hypervisor do; any other failure is a
    /// [`KvmError::VcpuPart`] naming the part.
    pub fn save(&mut self) -> Result<VcpuState, KvmError> {
        self.settle()?;
        let id = self.id;
        let fd = &self.fd;
        let part = |part, ioctl| part_error(id, part, ioctl);
        let mp_state = fd
            .get_mp_state()
            .map_err(part(VcpuPart::MpState, "KVM_GET_MP_STATE"))?;
        let regs = fd
            .get_regs()
            .map_err(part(VcpuPart::Regs, "KVM_GET_REGS"))?;
        let sregs = fd
            .get_sregs()
            .map_err(part(VcpuPart::Sregs, "KVM_GET_SREGS"))?;
        let mut st = VcpuState {
            regs,
            sregs,
            mp_state: Some(mp_state),
            ..VcpuState::default()
        };
        match self.caps.xsave_len {
            Some(len) => st.xsave = Some(self.get_xsave(len)?),
            None => st.fpu = Some(fd.get_fpu().map_err(part(VcpuPart::Fpu, "KVM_GET_FPU"))?),
        }
        if self.caps.xcrs {
            st.xcrs = Some(
                fd.get_xcrs()
                    .map_err(part(VcpuPart::Xcrs, "KVM_GET_XCRS"))?,
            );
        }
        st.lapic = match fd.get_lapic() {
            Ok(l) => Some(l),
            // No in-kernel local APIC (KVM answers EINVAL): the VMM
            // emulates it (or there is none), and it is the VMM's device
            // state.
            Err(e) if e.errno() == Errno::EINVAL as i32 => None,
            Err(e) => return Err(part(VcpuPart::Lapic, "KVM_GET_LAPIC")(e)),
        };
        st.msrs = self.get_msrs()?;
        if st.lapic.is_none() {
            // Without an in-kernel local APIC these cannot be enabled (KVM
            // refuses a write to them, even of their reset value), so they
            // hold nothing and would only make the restore fail.
            st.msrs.retain(|m| !LAPIC_MSRS.contains(&m.index));
        }
        if self.caps.vcpu_events {
            st.events = Some(
                fd.get_vcpu_events()
                    .map_err(part(VcpuPart::Events, "KVM_GET_VCPU_EVENTS"))?,
            );
        }
        if self.caps.debugregs {
            st.debugregs = Some(
                fd.get_debug_regs()
                    .map_err(part(VcpuPart::DebugRegs, "KVM_GET_DEBUGREGS"))?,
            );
        }
        if self.caps.tsc_khz {
            st.tsc_khz = Some(
                fd.get_tsc_khz()
                    .map_err(part(VcpuPart::TscKhz, "KVM_GET_TSC_KHZ"))?,
            );
        }
        Ok(st)
    }

    /// Completes a pending I/O exit without running guest code (see
    /// [`Vcpu::save`]).
    fn settle(&mut self) -> Result<(), KvmError> {
        let id = self.id;
        self.fd.set_kvm_immediate_exit(1);
        // The exit borrows the fd; keep only what the error needs.
        let settled = self.fd.run().map(|exit| format!("{exit:?}"));
        self.fd.set_kvm_immediate_exit(0);
        match settled {
            Err(e) if e.errno() == Errno::EINTR as i32 => Ok(()),
            Err(e) => Err(KvmError::ioctl(
                format!("KVM_RUN with immediate_exit (vCPU {id}), to complete a pending exit"),
                Errno::from_raw(e.errno()),
            )),
            Ok(exit) => Err(KvmError::Guest {
                vcpu: id,
                what: format!(
                    "completing a pending exit before saving the state gave exit {exit}, \
                     where KVM_RUN with immediate_exit should return EINTR"
                ),
            }),
        }
    }

    /// `KVM_GET_XSAVE2` into a buffer of the `len` bytes `KVM_CAP_XSAVE2`
    /// asks for.
    fn get_xsave(&self, len: usize) -> Result<Vec<u8>, KvmError> {
        let mut xsave = xsave_buffer(self.id, len)?;
        // SAFETY: the buffer holds `len` bytes (the header's 4096 and the
        // rest as FAM entries), which is what KVM_CAP_XSAVE2 said this VM's
        // vCPUs write; this process enables no XSTATE feature afterwards.
        unsafe { self.fd.get_xsave2(&mut xsave) }.map_err(|e| KvmError::VcpuPart {
            vcpu: self.id,
            part: VcpuPart::Xsave,
            ioctl: "KVM_GET_XSAVE2",
            errno: Errno::from_raw(e.errno()),
            hint: "",
        })?;
        let words = xsave.as_fam_struct_ref().xsave.region.iter();
        let bytes: Vec<u8> = words
            .chain(xsave.as_slice())
            .flat_map(|w| w.to_le_bytes())
            .take(len)
            .collect();
        Ok(bytes)
    }

    /// Every listed MSR this vCPU will read, [`MSR_CHUNK`] per ioctl. KVM
    /// reads entries in order and stops at the first it refuses, returning
    /// how many it read: that one is skipped and the rest read again.
    fn get_msrs(&self) -> Result<Vec<Msr>, KvmError> {
        let mut out = Vec::with_capacity(self.caps.msrs.len());
        let mut rest: &[u32] = &self.caps.msrs;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(MSR_CHUNK)];
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|_| KvmError::VcpuMismatch {
                vcpu: self.id,
                part: VcpuPart::Msrs,
                why: format!("{} MSRs do not fit kvm_msrs", entries.len()),
            })?;
            let read = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(|e| KvmError::VcpuPart {
                    vcpu: self.id,
                    part: VcpuPart::Msrs,
                    ioctl: "KVM_GET_MSRS",
                    errno: Errno::from_raw(e.errno()),
                    hint: "",
                })?;
            let read = read.min(chunk.len());
            out.extend(msrs.as_slice()[..read].iter().map(|e| Msr {
                index: e.index,
                data: e.data,
            }));
            // Skip the refused one, if any.
            rest = &rest[(read + 1).min(rest.len())..];
        }
        Ok(out)
    }

    /// Loads `state` (from [`Vcpu::save`], possibly on another VM whose
    /// memory holds the same guest and whose vCPU has the same CPUID), in
    /// this order, each step for the reason given:
    ///
    /// 1. the TSC frequency, when it differs from this vCPU's (before the
    ///    TSC itself is written, which it scales);
    /// 2. sregs, then regs (segments and modes first, so `rip` and `rflags`
    ///    are taken in the mode they belong to, and EFER before the MSRs
    ///    that depend on long mode);
    /// 3. the XSAVE area (or FPU) and the XCRs;
    /// 4. the MSRs but `IA32_TSC_DEADLINE`, `KVM_MAX_MSR_ENTRIES` per ioctl;
    ///    `IA32_TSC` among them makes the guest's TSC continue from its
    ///    saved value;
    /// 5. the MP state, then the local APIC (after sregs set its base);
    /// 6. `IA32_TSC_DEADLINE`, which KVM drops unless the APIC's timer is
    ///    in TSC-deadline mode;
    /// 7. the pending events last (they may inject into the state above),
    ///    with the NMI-pending and SIPI-vector fields marked valid, which
    ///    `KVM_GET_VCPU_EVENTS` does not mark;
    /// 8. the debug registers.
    ///
    /// A LAPIC this vCPU lacks or an XSAVE area larger than its own is
    /// [`KvmError::VcpuMismatch`] before anything is loaded. A part KVM
    /// refuses is [`KvmError::VcpuPart`] naming it; an MSR KVM refuses is
    /// [`KvmError::Msr`] naming its index and value; the vCPU is then
    /// partly loaded and must not run.
    pub fn restore(&self, state: &VcpuState) -> Result<(), KvmError> {
        let id = self.id;
        let fd = &self.fd;
        let part = |part, ioctl| part_error(id, part, ioctl);
        // Refuse a state this vCPU cannot take (a LAPIC it lacks, an
        // XSAVE area larger than its own) before changing anything.
        if state.lapic.is_some() && !self.has_lapic()? {
            return Err(KvmError::VcpuMismatch {
                vcpu: id,
                part: VcpuPart::Lapic,
                why: "the state has an in-kernel local APIC but this VM has none; create it \
                      with an irqchip (VmBuilder::irqchip), as the source was"
                    .into(),
            });
        }
        if let Some(x) = &state.xsave {
            self.check_xsave_fits(x)?;
        }
        if let Some(khz) = state.tsc_khz {
            let here = if self.caps.tsc_khz {
                fd.get_tsc_khz()
                    .map_err(part(VcpuPart::TscKhz, "KVM_GET_TSC_KHZ"))?
            } else {
                0
            };
            if here != khz {
                fd.set_tsc_khz(khz).map_err(|e| KvmError::VcpuPart {
                    vcpu: id,
                    part: VcpuPart::TscKhz,
                    ioctl: "KVM_SET_TSC_KHZ",
                    errno: Errno::from_raw(e.errno()),
                    hint: "; the destination cannot scale its TSC to the source's frequency \
                           (KVM_CAP_TSC_CONTROL); migrate between hosts of the same TSC rate",
                })?;
            }
        }
        fd.set_sregs(&state.sregs)
            .map_err(part(VcpuPart::Sregs, "KVM_SET_SREGS"))?;
        fd.set_regs(&state.regs)
            .map_err(part(VcpuPart::Regs, "KVM_SET_REGS"))?;
        if let Some(x) = &state.xsave {
            self.set_xsave(x)?;
        }
        if let Some(f) = &state.fpu {
            fd.set_fpu(f).map_err(part(VcpuPart::Fpu, "KVM_SET_FPU"))?;
        }
        if let Some(x) = &state.xcrs {
            fd.set_xcrs(x)
                .map_err(part(VcpuPart::Xcrs, "KVM_SET_XCRS"))?;
        }
        let (deadline, msrs): (Vec<Msr>, Vec<Msr>) = state
            .msrs
            .iter()
            .partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
        self.set_msrs(&msrs)?;
        if let Some(m) = state.mp_state {
            fd.set_mp_state(m)
                .map_err(part(VcpuPart::MpState, "KVM_SET_MP_STATE"))?;
        }
        if let Some(l) = &state.lapic {
            fd.set_lapic(l)
                .map_err(part(VcpuPart::Lapic, "KVM_SET_LAPIC"))?;
        }
        self.set_msrs(&deadline)?;
        if let Some(e) = &state.events {
            let mut e = *e;
            e.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
            fd.set_vcpu_events(&e)
                .map_err(part(VcpuPart::Events, "KVM_SET_VCPU_EVENTS"))?;
        }
        if let Some(d) = &state.debugregs {
            fd.set_debug_regs(d)
                .map_err(part(VcpuPart::DebugRegs, "KVM_SET_DEBUGREGS"))?;
        }
        Ok(())
    }

    /// Whether this vCPU has an in-kernel local APIC (`KVM_GET_LAPIC`
    /// answers EINVAL when it has none).
    fn has_lapic(&self) -> Result<bool, KvmError> {
        match self.fd.get_lapic() {
            Ok(_) => Ok(true),
            Err(e) if e.errno() == Errno::EINVAL as i32 => Ok(false),
            Err(e) => Err(KvmError::VcpuPart {
                vcpu: self.id,
                part: VcpuPart::Lapic,
                ioctl: "KVM_GET_LAPIC",
                errno: Errno::from_raw(e.errno()),
                hint: "",
            }),
        }
    }

    /// This vCPU's XSAVE area size, if `saved` fits in it.
    fn check_xsave_fits(&self, saved: &[u8]) -> Result<usize, KvmError> {
        let mismatch = |why: String| KvmError::VcpuMismatch {
            vcpu: self.id,
            part: VcpuPart::Xsave,
            why,
        };
        let len = self.caps.xsave_len.ok_or_else(|| {
            mismatch("this host's KVM has no KVM_CAP_XSAVE2; restore on a host with XSAVE".into())
        })?;
        if saved.len() > len {
            return Err(mismatch(format!(
                "the saved XSAVE area is {} bytes, this vCPU's is {len}; the source enabled \
                 XSTATE features (such as AMX) this destination lacks",
                saved.len()
            )));
        }
        Ok(len)
    }

    /// `KVM_SET_XSAVE` from a buffer of the size this VM's
    /// `KVM_CAP_XSAVE2` gives, holding `saved` and zeros after it.
    fn set_xsave(&self, saved: &[u8]) -> Result<(), KvmError> {
        let len = self.check_xsave_fits(saved)?;
        let mut xsave = xsave_buffer(self.id, len)?;
        let mut words = saved
            .chunks(4)
            .map(|c| {
                let mut w = [0u8; 4];
                w[..c.len()].copy_from_slice(c);
                u32::from_le_bytes(w)
            })
            .chain(std::iter::repeat(0));
        // SAFETY: only the header's region is written through this
        // reference; the FAM length is left as allocated.
        let header = unsafe { xsave.as_mut_fam_struct() };
        for (d, s) in header.xsave.region.iter_mut().zip(&mut words) {
            *d = s;
        }
        for (d, s) in xsave.as_mut_slice().iter_mut().zip(&mut words) {
            *d = s;
        }
        // SAFETY: the buffer holds the `len` bytes KVM_CAP_XSAVE2 gives for
        // this VM, which is what KVM_SET_XSAVE reads.
        unsafe { self.fd.set_xsave2(&xsave) }.map_err(|e| KvmError::VcpuPart {
            vcpu: self.id,
            part: VcpuPart::Xsave,
            ioctl: "KVM_SET_XSAVE",
            errno: Errno::from_raw(e.errno()),
            hint: "; the saved area enables XSTATE features this vCPU's CPUID lacks, \
                   or is corrupt",
        })
    }

    /// `KVM_SET_MSRS`, [`MSR_CHUNK`] per ioctl; the first MSR KVM refuses
    /// is reported by index and value.
    fn set_msrs(&self, msrs: &[Msr]) -> Result<(), KvmError> {
        for chunk in msrs.chunks(MSR_CHUNK) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|m| kvm_msr_entry {
                    index: m.index,
                    reserved: 0,
                    data: m.data,
                })
                .collect();
            let kmsrs = Msrs::from_entries(&entries).map_err(|_| KvmError::VcpuMismatch {
                vcpu: self.id,
                part: VcpuPart::Msrs,
                why: format!("{} MSRs do not fit kvm_msrs", entries.len()),
            })?;
            let written = self.fd.set_msrs(&kmsrs).map_err(|e| KvmError::VcpuPart {
                vcpu: self.id,
                part: VcpuPart::Msrs,
                ioctl: "KVM_SET_MSRS",
                errno: Errno::from_raw(e.errno()),
                hint: "",
            })?;
            if let Some(m) = chunk.get(written) {
                return Err(KvmError::Msr {
                    vcpu: self.id,
                    ioctl: "KVM_SET_MSRS",
                    index: m.index,
                    data: m.data,
                    hint: "this vCPU's CPUID or this host's KVM does not offer it or \
                           refuses the value; give the destination vCPU the source's CPUID",
                });
            }
        }
        Ok(())
    }

    /// Runs the guest until it does port output or is interrupted. A full
    /// dirty ring (`KVM_EXIT_DIRTY_RING_FULL`) is drained into the VM's slots
    /// and the guest resumed, without returning. Any other exit is an error
    /// naming it and the guest's instruction pointer.
    pub fn run(&mut self, vm: &Vm) -> Result<VcpuEvent, KvmError> {
        let mut empty_drains = 0;
        loop {
            let unexpected = match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    return Ok(VcpuEvent::IoOut {
                        port,
                        data: data.first().copied().unwrap_or(0),
                    })
                }
                Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => {
                    self.ring_full_exits += 1;
                    if vm.collect_dirty_rings()? == 0 {
                        empty_drains += 1;
                        if empty_drains > 3 {
                            return Err(KvmError::Guest {
                                vcpu: self.id,
                                what: "KVM reports the dirty ring full but it holds no \
                                       entries; is this vCPU's ring mapped by this VM?"
                                    .into(),
                            });
                        }
                    }
                    continue;
                }
                Ok(other) => format!("unexpected exit {other:?}"),
                Err(e) if e.errno() == Errno::EINTR as i32 || e.errno() == Errno::EAGAIN as i32 => {
                    return Ok(VcpuEvent::Interrupted)
                }
                Err(e) => {
                    return Err(KvmError::ioctl(
                        format!("KVM_RUN (vCPU {})", self.id),
                        Errno::from_raw(e.errno()),
                    ))
                }
            };
            let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
            return Err(KvmError::Guest {
                vcpu: self.id,
                what: format!("{unexpected} at rip {rip:#x}"),
            });
        }
    }
}

/// The error for `ioctl` failing on `part` of vCPU `vcpu`, as a `map_err`
/// argument: what saving and restoring a vCPU's state both report.
fn part_error(
    vcpu: u64,
    part: VcpuPart,
    ioctl: &'static str,
) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |e| KvmError::VcpuPart {
        vcpu,
        part,
        ioctl,
        errno: Errno::from_raw(e.errno()),
        hint: "",
    }
}
