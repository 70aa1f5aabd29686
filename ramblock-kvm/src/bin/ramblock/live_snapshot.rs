//! `ramblock snapshot save PATH --live`: the test guest is snapshotted
//! while it runs ([`LiveSave`]: copy-before-write over synchronous
//! userfaultfd write-protect), then paused and checked: the file, restored
//! into fresh memory, must be the guest's RAM at the instant, which the
//! guest's RAM now must equal advanced by the increment loop from the page
//! it was at then (`check_resumed_increment`).
//!
//! The guest's loop rate is measured exactly, from the runner's heartbeats
//! (one per pass) and the loop's page at each end of a window (from the
//! paused vCPU's registers): before the instant, over --rate-window-ms, and
//! during the save.

use crate::memory::RAM_BLOCK;
use crate::snapshot::{
    bar, cpu_section, fresh_memory, ms, start_save_guest, with_suffix, Report, SaveArgs, SaveGuest,
};
use ramblock_core::host::HostMemory;
use ramblock_core::name::BlockName;
use ramblock_core::snapshot::Kind;
use ramblock_kvm::guest::{check_resumed_increment, Workload};
use ramblock_kvm::runner::VcpuRunner;
use ramblock_linux::snapshot::{
    restore_eager, save, verify_block, LiveBlock, LiveSave, RestoreTarget, SaveBlock, SaveOptions,
    SnapshotChain,
};
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

/// Where the paused guest's loop is: pages written since it started,
/// counting whole passes by heartbeats (one per pass, counted at the pass's
/// `out`) and the rest by the page it writes next.
/// Also returns that next page and the vCPU state.
fn position(runner: &VcpuRunner, work: &Workload) -> Result<(u64, u64, Vec<u8>), String> {
    let state = runner.snapshot().map_err(|e| e.to_string())?;
    let next = work.next_page_index(&state).map_err(|e| e.to_string())?;
    Ok((
        runner.heartbeats() * work.pages() + next,
        next,
        state.to_bytes(),
    ))
}

/// Loops per second between two positions `elapsed` apart.
fn loop_rate(from: u64, to: u64, work: &Workload, elapsed: Duration) -> f64 {
    to.saturating_sub(from) as f64 / work.pages() as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// The `q` quantile of sorted nanoseconds, in microseconds.
fn quantile_us(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i] as f64 / 1e3
}

pub fn save_live(a: &SaveArgs) -> Result<Report, String> {
    let SaveGuest {
        ram,
        vm: _vm,
        runner,
        work,
    } = start_save_guest(a, false)?;
    let view = ram.read();
    let block = view.by_name(RAM_BLOCK).ok_or("no guest RAM block")?;

    // An old file at PATH goes now: truncating it inside the instant
    // would stop the guest while its blocks are freed.
    match std::fs::remove_file(&a.path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("{}: {e}", a.path.display()))
        }
        _ => {}
    }
    // The loop rate before: a window of free running.
    runner.pause();
    let (before_from, _, _) = position(&runner, &work)?;
    runner.resume();
    let window = Instant::now();
    std::thread::sleep(Duration::from_millis(a.rate_window_ms.max(1)));
    // The instant: paused, its state captured, its RAM protected.
    let t_pause = Instant::now();
    runner.pause();
    let before_window = window.elapsed();
    let (at_instant, next_page, state) = position(&runner, &work)?;
    let sections = [cpu_section(&state)];
    let blocks = [LiveBlock {
        name: BlockName::new(RAM_BLOCK).expect("valid"),
        memory: block.memory(),
    }];
    let options = SaveOptions {
        threads: 1,
        direct: false,
        sync: false,
    };
    let t_start = Instant::now();
    let live = LiveSave::start(&a.path, &blocks, &sections, options);
    runner.resume();
    let paused_for = t_pause.elapsed();
    let t_resumed = Instant::now();
    let pb = bar(a.size, a.json, "saving live");
    let saved = live
        .and_then(|live| live.run(&|n| pb.set_position(n)))
        .map_err(|e| e.to_string());
    let total = t_start.elapsed();
    runner.pause();
    let during_window = t_resumed.elapsed();
    pb.finish_and_clear();
    let saved = saved?;
    let (at_end, _, _) = position(&runner, &work)?;
    if let Some(e) = runner.error() {
        return Err(format!("the guest stopped during the live save: {e}"));
    }

    // The check: the file restored into fresh memory is the instant's
    // RAM, which the guest's RAM now is, advanced by the loop from there.
    let chain = SnapshotChain::open(&a.path).map_err(|e| e.to_string())?;
    let entry = &chain.blocks()[0];
    let image = fresh_memory(entry.used_length.0, entry.page_size, false)?;
    restore_eager(
        &chain,
        &[RestoreTarget {
            name: RAM_BLOCK,
            region: image.region(),
            page_size: image.page_size(),
        }],
        2,
        &|_| {},
    )
    .map_err(|e| e.to_string())?;
    let data_ok = chain.files().iter().all(|f| f.verify_data().is_ok());
    let content_ok = verify_block(&chain, RAM_BLOCK, &image.region()).is_ok();
    let check = check_resumed_increment(&image.region(), &block.region(), &work, next_page);
    if let Err(e) = &check {
        eprintln!("live snapshot against the guest's RAM now: {e}");
    }

    let mut service: Vec<u64> = saved
        .copies
        .iter()
        .flat_map(|c| c.fault_service_ns.iter().copied())
        .collect();
    service.sort_unstable();
    let faults: u64 = saved.copies.iter().map(|c| c.faults).sum();
    let faulted: u64 = saved.copies.iter().map(|c| c.faulted_pages).sum();
    let mut report = Report {
        text: format!(
            "saved {} MiB running guest (live) to {}\n",
            a.size >> 20,
            a.path.display()
        ),
        ..Report::default()
    };
    report.str("path", &a.path.display().to_string());
    report.fields.push(("live", "true".into()));
    report.num("bytes_written", saved.save.bytes_written as f64);
    report.num("pages_held", saved.save.pages_held as f64);
    report.num("zero_pages", saved.save.zero_pages as f64);
    report.num("save_ms", ms(total));
    report.num("guest_paused_ms", ms(paused_for));
    report.num(
        "loops_per_s_before",
        loop_rate(before_from, at_instant, &work, before_window),
    );
    report.num(
        "loops_per_s_during",
        loop_rate(at_instant, at_end, &work, during_window),
    );
    report.num("faults", faults as f64);
    report.num("faulted_pages", faulted as f64);
    report.num("fault_service_p50_us", quantile_us(&service, 0.5));
    report.num("fault_service_p99_us", quantile_us(&service, 0.99));
    report.num("next_page_at_instant", next_page as f64);
    if let Ok(d) = &check {
        report.num("guest_passes_during", f64::from(d.full_passes));
    }
    if a.compare_paused {
        // The same guest, paused for a whole save (it is paused now).
        let p = with_suffix(&a.path, ".paused");
        let pages = block.used_length().0 / 4096;
        let digests: Vec<AtomicU64> = (0..pages).map(|_| AtomicU64::new(0)).collect();
        let t = Instant::now();
        let state = runner.snapshot().map_err(|e| e.to_string())?.to_bytes();
        let sections = [cpu_section(&state)];
        let s = save(
            &p,
            &[SaveBlock {
                name: BlockName::new(RAM_BLOCK).expect("valid"),
                region: block.region(),
                page_size: block.page_size(),
                pages: None,
                digests: &digests,
            }],
            &sections,
            Kind::Full,
            SaveOptions {
                threads: a.threads.max(1),
                direct: false,
                sync: false,
            },
            &|_| {},
        );
        let paused = t.elapsed();
        let _ = std::fs::remove_file(&p);
        s.map_err(|e| format!("the paused comparison save: {e}"))?;
        report.num("paused_save_ms", ms(paused));
        report.num(
            "live_vs_paused",
            total.as_secs_f64() / paused.as_secs_f64().max(1e-9),
        );
    }
    report.verified = Some(data_ok && content_ok && check.is_ok());
    let _ = runner.stop();
    Ok(report)
}
