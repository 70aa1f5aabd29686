//! [`GuestError`]: everything that can go wrong in the test guests, the vCPU
//! runner and the vCPU state blobs they pass around (feature
//! `test-guest`).
//!
//! It is its own type, not variants of [`KvmError`], so that the library a
//! VMM links names no test-guest failure; a [`KvmError`] from the VM or
//! vCPU underneath converts into it with `?`.

use crate::error::KvmError;
use crate::vcpu_state::VcpuStateError;

/// A failure of a test guest, the vCPU runner or a register blob. Each
/// message says what was asked, what was found and what to do.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The VM or vCPU underneath failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// A test-guest program does not fit or makes no sense.
    #[error("test guest: {0}")]
    Layout(String),
    /// A test guest wrote to an I/O port that whoever runs it does not
    /// serve.
    #[error("vCPU {vcpu}: {who} wrote {data:#x} to port {port:#x}, which it does not serve")]
    UnexpectedPort {
        /// The vCPU.
        vcpu: u64,
        /// What ran it (`"the page writer"`, `"the runner"`).
        who: &'static str,
        /// The port.
        port: u16,
        /// The first byte written.
        data: u8,
    },
    /// The vCPU runner's thread could not be started.
    #[error("vCPU {vcpu}: cannot start the vCPU thread: {source}; check the process's thread limit (ulimit -u)")]
    Spawn {
        /// The vCPU.
        vcpu: u64,
        /// Why the thread was not created.
        source: std::io::Error,
    },
    /// A vCPU state blob could not be decoded.
    #[error(transparent)]
    VcpuState(#[from] VcpuStateError),
    /// The operation needs a paused vCPU runner.
    #[error("{what} needs vCPU {vcpu}'s runner paused, but it is {state}; call pause() first")]
    NotPaused {
        /// The operation.
        what: &'static str,
        /// The vCPU.
        vcpu: u64,
        /// `"running"` or `"stopped"`.
        state: &'static str,
    },
    /// A vCPU state is not a point in the [`crate::guest::Workload`] loop.
    #[error("vCPU state with rip {rip:#x}, ebx {rbx:#x}, ecx {rcx:#x} is not a point in the workload loop: {why}; was it taken from a vCPU running this Workload?")]
    WorkloadState {
        /// The instruction pointer.
        rip: u64,
        /// The page pointer.
        rbx: u64,
        /// The page counter.
        rcx: u64,
        /// What does not fit.
        why: String,
    },
}

impl GuestError {
    /// The errno behind the error, if it came from the kernel.
    pub fn errno(&self) -> Option<nix::errno::Errno> {
        match self {
            GuestError::Kvm(e) => e.errno(),
            GuestError::Spawn { source, .. } => {
                source.raw_os_error().map(nix::errno::Errno::from_raw)
            }
            _ => None,
        }
    }
}
