//! What writes to guest RAM while it migrates: a KVM vCPU, or (without
//! KVM) a host thread writing through the block API as a device would.

use crate::memory::{GuestRam, RAM_BLOCK};
use crate::options::Workload;
use ramblock_core::addr::ByteLen;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A running guest the migration can pause, resume and throttle.
pub trait Guest: Send {
    /// Stops writing and returns once no more writes can happen.
    fn pause(&mut self);
    /// Writes again.
    fn resume(&mut self);
    /// Sleeps `percent` of the time.
    fn set_throttle(&mut self, percent: u8);
    /// Work done so far (completed loop passes, or pages written).
    fn progress(&self) -> u64;
    /// Why the guest stopped on its own (a vCPU error), if it did.
    fn failure(&self) -> Option<String> {
        None
    }
    /// The paused guest's device state for a post-copy destination (empty:
    /// nothing to start there).
    fn save_state(&mut self) -> Vec<u8> {
        Vec::new()
    }
    /// Stops for good.
    fn stop(&mut self);
}

#[derive(Default)]
struct Control {
    paused: AtomicBool,
    parked: AtomicBool,
    stop: AtomicBool,
    throttle: AtomicU8,
    progress: AtomicU64,
}

/// A host thread standing in for the vCPU when there is no KVM.
pub struct HostWriter {
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

impl HostWriter {
    /// Starts `workload` against `ram`: through the block API, which marks
    /// what it writes dirty, or (`raw`) straight into the memory, as an
    /// emulator's vCPU writes, which only a write tracker sees.
    pub fn start(ram: &'static GuestRam, workload: Workload, raw: bool) -> HostWriter {
        let control = Arc::new(Control::default());
        let c = control.clone();
        let thread = std::thread::spawn(move || write_loop(ram, workload, raw, &c));
        HostWriter {
            control,
            thread: Some(thread),
        }
    }
}

fn write_loop(ram: &GuestRam, workload: Workload, raw: bool, c: &Control) {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next_page = 256; // 1 MiB
    let mut last_burst = Instant::now();
    while !c.stop.load(Ordering::Acquire) {
        // An idle guest never writes, so it is always parked: pausing it
        // costs the downtime nothing.
        if c.paused.load(Ordering::Acquire) || workload == Workload::Idle {
            c.parked.store(true, Ordering::Release);
            std::thread::sleep(Duration::from_micros(100));
            continue;
        }
        c.parked.store(false, Ordering::Release);
        let burst = Instant::now();
        {
            let view = ram.read();
            let Some(block) = view.by_name(RAM_BLOCK) else {
                return;
            };
            let pages = block.used_pages() as u64;
            let region = block.region();
            let write = |at: ByteLen, data: &[u8]| {
                if raw {
                    let _ = region.write(at, data);
                } else {
                    let _ = block.write(at, data);
                }
            };
            match workload {
                Workload::Idle => {}
                Workload::Increment => {
                    // One byte in each of 256 pages per burst, wrapping at the top.
                    for _ in 0..256 {
                        let at = ByteLen(next_page << 12);
                        let mut b = [0u8];
                        if block.read(at, &mut b).is_ok() {
                            write(at, &[b[0].wrapping_add(1)]);
                        }
                        next_page += 1;
                        if next_page >= pages {
                            next_page = 256.min(pages.saturating_sub(1));
                            c.progress.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Workload::Random(rate) => {
                    // `rate` pages per second of running time: a burst
                    // writes what the time since the last one is worth, at
                    // most 10 ms' worth, so time spent paused or throttled
                    // is never made up afterwards (a backlog written while
                    // a pause waits would count as downtime), and it stops
                    // as soon as a pause is asked for.
                    let since = last_burst.elapsed().as_secs_f64().min(0.01);
                    last_burst = Instant::now();
                    let due = (since * rate as f64) as u64;
                    for n in 0..due {
                        if n % 64 == 0 && c.paused.load(Ordering::Acquire) {
                            break;
                        }
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        write(ByteLen((x % pages) << 12), &x.to_le_bytes());
                        c.progress.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if matches!(workload, Workload::Random(_)) {
            std::thread::sleep(Duration::from_micros(200));
        }
        let throttle = u32::from(c.throttle.load(Ordering::Relaxed).min(99));
        if throttle > 0 {
            nap(burst.elapsed() * throttle / (100 - throttle), c);
        }
    }
}

/// The throttle's sleep, ended early by a pause or a stop: at 99% a nap is
/// 99 times the burst before it, and a pause waiting for it would count
/// every millisecond of it as downtime.
fn nap(length: Duration, c: &Control) {
    let until = Instant::now() + length;
    loop {
        let now = Instant::now();
        if now >= until || c.paused.load(Ordering::Acquire) || c.stop.load(Ordering::Acquire) {
            return;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(1)));
    }
}

impl Guest for HostWriter {
    fn pause(&mut self) {
        self.control.paused.store(true, Ordering::Release);
        while !self.control.parked.load(Ordering::Acquire)
            && self.thread.as_ref().is_some_and(|t| !t.is_finished())
        {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
    fn resume(&mut self) {
        self.control.paused.store(false, Ordering::Release);
    }
    fn set_throttle(&mut self, percent: u8) {
        self.control.throttle.store(percent, Ordering::Relaxed);
    }
    fn progress(&self) -> u64 {
        self.control.progress.load(Ordering::Relaxed)
    }
    fn stop(&mut self) {
        self.control.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for HostWriter {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A post-copy destination with nothing to run (the source's writer was a
/// host thread, whose state does not move).
pub struct NoGuest;

impl Guest for NoGuest {
    fn pause(&mut self) {}
    fn resume(&mut self) {}
    fn set_throttle(&mut self, _: u8) {}
    fn progress(&self) -> u64 {
        0
    }
    fn stop(&mut self) {}
}
