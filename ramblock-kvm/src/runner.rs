//! [`VcpuRunner`]: a vCPU running a guest on its own thread, which the
//! migration thread can pause, resume, throttle and stop.
//!
//! Kicking: the runner's thread records where its `kvm_run.immediate_exit`
//! lives in a thread-local; a kick sends it [`kick_signal`], whose handler
//! (running on that thread) sets `immediate_exit`. A signal that lands
//! inside `KVM_RUN` ends it with `EINTR`; one that lands just before makes
//! the next `KVM_RUN` return at once, so no kick is lost. The thread clears
//! `immediate_exit` and checks the request under the control lock before
//! each run.
//!
//! Throttling (for auto-converge): a ticker kicks the vCPU every
//! [`THROTTLE_TICK`] while a throttle is set, and after each `KVM_RUN` the
//! vCPU sleeps `run_time * f / (1 - f)`, so it is stopped a fraction `f` of
//! the time.
//!
//! Snapshots (post-copy switch-over): [`VcpuRunner::snapshot`] asks the
//! paused thread, which owns the vCPU, to read its registers
//! ([`Vcpu::save`]) and waits for the answer; the thread goes straight back
//! to waiting, so the guest stays paused.
//!
//! Reaping (dirty-ring mode): the same ticker collects the VM's dirty rings
//! every [`REAP_TICK`] while the vCPU runs, as QEMU's reaper thread does, so
//! a guest that writes fast never fills its ring between harvests. KVM
//! publishes entries with release stores and allows `KVM_RESET_DIRTY_RINGS`
//! while vCPUs run, so no kick is needed. This also matters on hosts that
//! do not stop a vCPU whose ring is full (seen with PVM): there, a ring left
//! to fill silently loses entries.

use crate::guest::HEARTBEAT_PORT;
use crate::guest_error::GuestError;
use crate::vcpu::{Vcpu, VcpuEvent};
use crate::vcpu_state::VcpuState;
use crate::vm::Vm;
use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often a throttled vCPU is kicked out to sleep.
pub const THROTTLE_TICK: Duration = Duration::from_millis(10);

/// How often the dirty rings are reaped in ring mode. At the ~0.4 M
/// pages/s a logging guest can dirty, that is under 1000 entries per reap.
pub const REAP_TICK: Duration = Duration::from_millis(2);

/// The real-time signal used to kick vCPU threads.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, or null.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int) {
    let ptr = IMMEDIATE_EXIT.with(Cell::get);
    if !ptr.is_null() {
        // SAFETY: set by this thread to a byte of its own vCPU's mapped
        // `kvm_run`, which stays mapped while the thread runs (the thread
        // clears the pointer before giving the vCPU back); a volatile byte
        // store is async-signal-safe.
        unsafe { ptr.write_volatile(1) };
    }
}

fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler only does a
        // volatile store through a thread-local pointer. No SA_RESTART, so
        // KVM_RUN returns EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    /// Paused, and the thread is to put the vCPU's state in
    /// `Control::snapshot`, then go back to `Pause`.
    Snapshot,
    Stop,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum State {
    Running,
    Paused,
    Stopped,
}

#[derive(Debug)]
struct Control {
    request: Request,
    state: State,
    error: Option<GuestError>,
    /// The answer to a `Request::Snapshot`.
    snapshot: Option<Result<VcpuState, GuestError>>,
}

#[derive(Debug)]
struct Shared {
    control: Mutex<Control>,
    changed: Condvar,
    heartbeats: AtomicU64,
    /// Throttle fraction in millionths.
    throttle_ppm: AtomicU32,
    ticker_stop: AtomicBool,
}

impl Shared {
    /// A running vCPU's shared state, with `request` pending.
    fn new(request: Request) -> Shared {
        Shared {
            control: Mutex::new(Control {
                request,
                state: State::Running,
                error: None,
                snapshot: None,
            }),
            changed: Condvar::new(),
            heartbeats: AtomicU64::new(0),
            throttle_ppm: AtomicU32::new(0),
            ticker_stop: AtomicBool::new(false),
        }
    }
}

fn lock(m: &Mutex<Control>) -> MutexGuard<'_, Control> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A vCPU on its own thread; see the module docs.
#[derive(Debug)]
pub struct VcpuRunner {
    vcpu_id: u64,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Vcpu>>,
    ticker: Option<JoinHandle<()>>,
}

impl VcpuRunner {
    /// Starts running `vcpu` (already pointed at its guest) on a new thread.
    /// Each `out` to [`HEARTBEAT_PORT`] is counted; any other exit stops the
    /// runner with an error ([`VcpuRunner::error`]).
    pub fn spawn(vm: Arc<Vm>, vcpu: Vcpu) -> Result<VcpuRunner, GuestError> {
        install_handler();
        let shared = Arc::new(Shared::new(Request::Run));
        let s = shared.clone();
        let vcpu_id = vcpu.id();
        let vm_for_ticker = vm.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.id()))
            .spawn(move || vcpu_thread(&vm, vcpu, &s))
            .map_err(|source| GuestError::Spawn {
                vcpu: vcpu_id,
                source,
            })?;
        let pthread = thread.as_pthread_t();
        let s = shared.clone();
        let reap = vm_for_ticker.needs_reaping();
        let ticker = std::thread::Builder::new()
            .name("vcpu-ticker".into())
            .spawn(move || {
                let tick = if reap { REAP_TICK } else { THROTTLE_TICK };
                let per_throttle = (THROTTLE_TICK.as_micros() / tick.as_micros()).max(1);
                let mut ticks = 0u128;
                while !s.ticker_stop.load(Ordering::Acquire) {
                    std::thread::sleep(tick);
                    ticks += 1;
                    if reap {
                        // A failed reap leaves the entries for the next
                        // harvest, which reports the error.
                        let _ = vm_for_ticker.collect_dirty_rings();
                    }
                    if ticks % per_throttle == 0 && s.throttle_ppm.load(Ordering::Relaxed) > 0 {
                        // SAFETY: the vCPU thread is joined only after this
                        // ticker is stopped and joined, so `pthread` is live.
                        unsafe { libc::pthread_kill(pthread, kick_signal()) };
                    }
                }
            })
            .ok();
        Ok(VcpuRunner {
            vcpu_id,
            shared,
            thread: Some(thread),
            ticker,
        })
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            // SAFETY: the thread has not been joined (we hold its handle), so
            // its pthread_t is valid even if it has finished.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }

    /// Waits until the vCPU's state is not `Running`, kicking it again every
    /// few milliseconds in case a kick raced with its exit.
    fn wait_until_stopped(&self) {
        let mut c = lock(&self.shared.control);
        while c.state == State::Running {
            drop(c);
            self.kick();
            c = lock(&self.shared.control);
            if c.state == State::Running {
                c = self
                    .shared
                    .changed
                    .wait_timeout(c, Duration::from_millis(5))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
        }
    }

    /// Stops the guest and returns once the vCPU is out of `KVM_RUN` (its
    /// writes are all in memory and in the dirty log).
    pub fn pause(&self) {
        {
            let mut c = lock(&self.shared.control);
            // Already paused (perhaps taking a snapshot) or stopping: leave
            // that request alone.
            if c.request == Request::Run {
                c.request = Request::Pause;
                // Wakes a vCPU napping for the throttle.
                self.shared.changed.notify_all();
            }
        }
        self.wait_until_stopped();
    }

    /// The paused vCPU's register state ([`Vcpu::save`]), read by its
    /// thread, which then stays paused: the guest runs no instruction.
    /// A runner that is running or has stopped is
    /// [`GuestError::NotPaused`]; pause it first.
    pub fn snapshot(&self) -> Result<VcpuState, GuestError> {
        let mut c = lock(&self.shared.control);
        // Another caller's snapshot in flight: wait until it has been
        // answered and its answer taken, so answers do not cross.
        while c.request == Request::Snapshot || c.snapshot.is_some() {
            c = self.wait(c);
        }
        let state = match (c.request, c.state) {
            (Request::Pause, State::Paused) => None,
            (_, State::Stopped) | (Request::Stop, _) => Some("stopped"),
            _ => Some("running"),
        };
        if let Some(state) = state {
            return Err(GuestError::NotPaused {
                what: "a vCPU state snapshot",
                vcpu: self.vcpu_id,
                state,
            });
        }
        c.request = Request::Snapshot;
        c.snapshot = None;
        self.shared.changed.notify_all();
        loop {
            if let Some(answer) = c.snapshot.take() {
                self.shared.changed.notify_all();
                return answer;
            }
            c = self.wait(c);
        }
    }

    fn wait<'g>(&self, c: MutexGuard<'g, Control>) -> MutexGuard<'g, Control> {
        self.shared
            .changed
            .wait(c)
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Lets a paused guest run again.
    pub fn resume(&self) {
        let mut c = lock(&self.shared.control);
        // A snapshot in flight finishes first (the guest must not move
        // under it), then the resume takes effect.
        while c.request == Request::Snapshot {
            c = self.wait(c);
        }
        if c.request == Request::Pause {
            c.request = Request::Run;
            self.shared.changed.notify_all();
        }
    }

    /// Whether the vCPU is paused (or has stopped).
    pub fn is_paused(&self) -> bool {
        lock(&self.shared.control).state != State::Running
    }

    /// Sets the fraction of time (0 to 0.99) the vCPU sleeps instead of
    /// running.
    pub fn set_throttle(&self, fraction: f64) {
        let f = fraction.clamp(0.0, 0.99);
        self.shared
            .throttle_ppm
            .store((f * 1e6) as u32, Ordering::Relaxed);
    }

    /// The throttle fraction.
    pub fn throttle(&self) -> f64 {
        f64::from(self.shared.throttle_ppm.load(Ordering::Relaxed)) / 1e6
    }

    /// Completed passes of the guest's workload (heartbeats).
    pub fn heartbeats(&self) -> u64 {
        self.shared.heartbeats.load(Ordering::Relaxed)
    }

    /// The error that stopped the vCPU, if any.
    pub fn error(&self) -> Option<String> {
        lock(&self.shared.control)
            .error
            .as_ref()
            .map(ToString::to_string)
    }

    /// Stops the vCPU for good and gives it back, with the error that
    /// stopped it early, if any.
    pub fn stop(mut self) -> (Option<Vcpu>, Option<GuestError>) {
        self.shutdown()
    }

    fn shutdown(&mut self) -> (Option<Vcpu>, Option<GuestError>) {
        {
            let mut c = lock(&self.shared.control);
            c.request = Request::Stop;
            self.shared.changed.notify_all();
        }
        self.wait_until_stopped();
        self.shared.ticker_stop.store(true, Ordering::Release);
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
        let vcpu = self.thread.take().and_then(|t| t.join().ok());
        (vcpu, lock(&self.shared.control).error.take())
    }
}

impl Drop for VcpuRunner {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.shutdown();
        }
    }
}

/// The throttle's sleep, on the control condvar so that a pause or stop
/// ends it at once (a migration pauses the guest to switch over, and every
/// millisecond of waiting for a napping vCPU is downtime). Returns whether
/// the vCPU may run on.
fn throttle_nap(s: &Shared, nap: Duration) -> bool {
    let deadline = Instant::now() + nap;
    let mut c = lock(&s.control);
    loop {
        if c.request != Request::Run {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        c = s
            .changed
            .wait_timeout(c, deadline - now)
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0);
    }
}

fn vcpu_thread(vm: &Vm, mut vcpu: Vcpu, s: &Shared) -> Vcpu {
    let run = vcpu.kvm_fd_mut().get_kvm_run();
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::addr_of_mut!(run.immediate_exit)));
    let mut last_run = Duration::ZERO;
    loop {
        {
            let mut c = lock(&s.control);
            vcpu.kvm_fd_mut().set_kvm_immediate_exit(0);
            loop {
                match c.request {
                    Request::Run => break,
                    Request::Snapshot => {
                        c.snapshot = Some(vcpu.save().map_err(GuestError::from));
                        c.request = Request::Pause;
                        s.changed.notify_all();
                    }
                    Request::Pause => {
                        c.state = State::Paused;
                        s.changed.notify_all();
                        c = s.changed.wait(c).unwrap_or_else(|e| e.into_inner());
                    }
                    Request::Stop => {
                        c.state = State::Stopped;
                        s.changed.notify_all();
                        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
                        return vcpu;
                    }
                }
            }
            c.state = State::Running;
        }
        let ppm = f64::from(s.throttle_ppm.load(Ordering::Relaxed)) / 1e6;
        if ppm > 0.0 && !last_run.is_zero() {
            // A run longer than a tick began before the throttle did (the
            // ticker kicks every tick once it is set): it earns one tick's
            // nap, not one proportional to time spent unthrottled.
            let nap = last_run
                .min(THROTTLE_TICK)
                .mul_f64(ppm / (1.0 - ppm))
                .min(Duration::from_secs(1));
            if !throttle_nap(s, nap) {
                continue; // a pause or stop came: answer it before running
            }
        }
        let t0 = Instant::now();
        let event = vcpu.run(vm);
        last_run = t0.elapsed();
        let error = match event {
            Ok(VcpuEvent::IoOut {
                port: HEARTBEAT_PORT,
                ..
            }) => {
                s.heartbeats.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Ok(VcpuEvent::Interrupted) => continue,
            Ok(VcpuEvent::IoOut { port, data }) => GuestError::UnexpectedPort {
                vcpu: vcpu.id(),
                who: "the runner",
                port,
                data,
            },
            Err(e) => e.into(),
        };
        let mut c = lock(&s.control);
        c.error = Some(error);
        c.state = State::Stopped;
        c.request = Request::Stop;
        s.changed.notify_all();
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
        return vcpu;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(request: Request) -> Arc<Shared> {
        Arc::new(Shared::new(request))
    }

    /// A pause or stop ends the throttle's nap: a vCPU never keeps a
    /// migration's switch-over waiting while it sleeps. (Were the nap not
    /// cut short, these would sleep for an hour.)
    #[test]
    fn a_pause_or_stop_ends_the_throttle_nap() {
        let hour = Duration::from_secs(3600);
        assert!(!throttle_nap(&shared(Request::Pause), hour));
        assert!(!throttle_nap(&shared(Request::Stop), hour));
        // Asked while napping: the request's notification wakes it.
        let s = shared(Request::Run);
        let napper = {
            let s = s.clone();
            std::thread::spawn(move || throttle_nap(&s, hour))
        };
        while !napper.is_finished() {
            let mut c = lock(&s.control);
            c.request = Request::Pause;
            s.changed.notify_all();
            drop(c);
            std::thread::yield_now();
        }
        assert!(!napper.join().unwrap());
        // Nothing asked: the nap runs its course and the vCPU runs on.
        assert!(throttle_nap(
            &shared(Request::Run),
            Duration::from_millis(1)
        ));
    }
}
