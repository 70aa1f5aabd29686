//! KVM memslots and the three KVM dirty-log modes for ramblock blocks.
//!
//! A [`vm::Vm`] maps blocks (or page ranges of them) at guest-physical
//! addresses as KVM memslots, keeping slot ids and ranges in its own table,
//! and harvests their dirty pages into each block's migration bitmap through
//! the core's [`ramblock_core::dirty_log::DirtyLogSource`]:
//!
//! - [`dirty::BitmapLog`] (`KVM_GET_DIRTY_LOG`);
//! - [`dirty::ManualProtectLog`] (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, with
//!   `KVM_CLEAR_DIRTY_LOG` just before a chunk's first page is sent);
//! - [`dirty::RingLog`] (`KVM_CAP_DIRTY_LOG_RING`, drained per vCPU).
//!
//! The mode is picked from the host's [`caps::Capabilities`] or asked for
//! with a [`mode::DirtyLogRequest`].
//!
//! A paused [`vcpu::Vcpu`] saves its whole x86-64 state
//! ([`vcpu_state::VcpuState`]: registers, FPU/XSAVE, saveable MSRs, local
//! APIC, pending events, TSC) with `Vcpu::save`, ships it as versioned
//! bytes, and another VM's vCPU loads it with `Vcpu::restore`
//! (docs/vcpu-state.md).
//!
//! ```no_run
//! use ramblock_kvm::dirty::KvmDirtyLog;
//! use ramblock_kvm::vm::VmBuilder;
//! let vm = VmBuilder::new().build()?;
//! println!("{} ({})", vm.mode(), vm.capabilities());
//! let _log = KvmDirtyLog::new(&vm);
//! # Ok::<(), ramblock_kvm::error::KvmError>(())
//! ```
//!
//! # Feature flags
//!
//! None is on by default: a VMM gets the library above and nothing else.
//!
//! - `test-guest`: demo and test code for this crate's tests, benches and
//!   program, not for a VMM. `guest` has tiny hand-assembled guests (a page
//!   writer and the migration workload), `runner` a vCPU thread that can be
//!   paused, resumed, throttled and snapshotted (its snapshot is a
//!   [`vcpu_state::VcpuState`]). Their failures are `GuestError`, which
//!   wraps a [`KvmError`].
//! - `cli`: the `ramblock` program (`cargo ramblock migrate`); implies
//!   `test-guest` and adds its command-line parser (clap).
#![deny(missing_docs)]

pub mod caps;
pub mod dirty;
pub mod error;
#[cfg(feature = "test-guest")]
pub mod guest;
#[cfg(feature = "test-guest")]
pub mod guest_error;
pub mod memslot;
pub mod mode;
#[cfg(feature = "test-guest")]
pub mod runner;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;

pub use error::KvmError;
#[cfg(feature = "test-guest")]
pub use guest_error::GuestError;

/// Locks `m`, carrying on if a thread panicked while holding it: the slot
/// table and the ring list stay consistent because every update is a single
/// assignment at the end.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
