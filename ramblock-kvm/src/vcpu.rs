//! [`Vcpu`]: one virtual CPU, run until it does something the VMM must see.

use crate::error::KvmError;
#[cfg(feature = "test-guest")]
use crate::vcpu_state::VcpuState;
use crate::vm::Vm;
use kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;
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

/// A vCPU of a [`Vm`].
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    id: u64,
    ring_full_exits: u64,
}

impl Vcpu {
    pub(crate) fn new(fd: VcpuFd, id: u64) -> Vcpu {
        Vcpu {
            fd,
            id,
            ring_full_exits: 0,
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
    pub(crate) fn kvm_fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// [`Vcpu::fd_mut`] for this crate's own calls.
    pub(crate) fn kvm_fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// How many times the dirty ring filled up and was drained.
    pub fn ring_full_exits(&self) -> u64 {
        self.ring_full_exits
    }

    /// The vCPU's register state, for migration. It must not be running.
    /// Feature `test-guest`: [`VcpuState`] holds what the test guests use,
    /// not all of a vCPU's state.
    ///
    /// KVM may finish an I/O exit (for `out`: step `rip` past it) only on
    /// the next `KVM_RUN`, keeping that pending step where `KVM_GET_REGS`
    /// does not show it (hosts that emulate the `out` have stepped already).
    /// So this first enters `KVM_RUN` with `immediate_exit` set, which
    /// completes a pending step and returns `EINTR` without running a guest
    /// instruction (the KVM API's documented way to make the state
    /// consistent before migrating); then it reads `KVM_GET_SREGS` and
    /// `KVM_GET_REGS`. Kernels that check `immediate_exit` first leave
    /// `rip` on the `out`, which then runs again on the destination.
    #[cfg(feature = "test-guest")]
    pub fn save(&mut self) -> Result<VcpuState, KvmError> {
        let id = self.id;
        self.fd.set_kvm_immediate_exit(1);
        // The exit borrows the fd; keep only what the error needs.
        let settled = self.fd.run().map(|exit| format!("{exit:?}"));
        self.fd.set_kvm_immediate_exit(0);
        match settled {
            Err(e) if e.errno() == Errno::EINTR as i32 => {}
            Err(e) => {
                return Err(KvmError::ioctl(
                    format!("KVM_RUN with immediate_exit (vCPU {id}), to complete a pending exit"),
                    Errno::from_raw(e.errno()),
                ))
            }
            Ok(exit) => {
                return Err(KvmError::Guest {
                    vcpu: id,
                    what: format!(
                        "completing a pending exit before saving the state gave exit {exit}, \
                         where KVM_RUN with immediate_exit should return EINTR"
                    ),
                })
            }
        }
        let sregs = self
            .fd
            .get_sregs()
            .map_err(|e| KvmError::from_kvm(format!("KVM_GET_SREGS (vCPU {id})"), e))?;
        let regs = self
            .fd
            .get_regs()
            .map_err(|e| KvmError::from_kvm(format!("KVM_GET_REGS (vCPU {id})"), e))?;
        Ok(VcpuState { regs, sregs })
    }

    /// Loads `state` (from [`Vcpu::save`], possibly on another VM whose
    /// memory holds the same guest): `KVM_SET_SREGS`, then `KVM_SET_REGS`
    /// (segments and modes first, so `rip` and `rflags` are taken in the
    /// mode they belong to).
    #[cfg(feature = "test-guest")]
    pub fn restore(&self, state: &VcpuState) -> Result<(), KvmError> {
        let id = self.id;
        self.fd
            .set_sregs(&state.sregs)
            .map_err(|e| KvmError::from_kvm(format!("KVM_SET_SREGS (vCPU {id})"), e))?;
        self.fd
            .set_regs(&state.regs)
            .map_err(|e| KvmError::from_kvm(format!("KVM_SET_REGS (vCPU {id})"), e))
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
