//! Harvesting a 4 GiB block: the uffd-wp log (`PAGEMAP_SCAN` reporting and
//! re-protecting written ranges) against KVM's bitmap mode
//! (`KVM_GET_DIRTY_LOG`, which fetches and re-protects), on the same dirty
//! pages, in the same run.
//!
//! One 4 GiB anonymous block is mapped at guest-physical 0 with KVM's
//! logging on *and* tracked by the uffd-wp log, so one guest pass dirties
//! both logs at once. Each round a CPL 3 page writer stores to a fraction
//! of the pages the 32-bit guest reaches (16 MiB up to the MMIO hole at
//! 0xFEC0_0000; its program lives below 16 MiB): every 100th page (1%) or
//! every page (~99% of the block). Then both logs are harvested into
//! bitmaps of their own (`DirtyLogSource::harvest`: the fetch and the
//! merge), in alternating order, and each harvest is timed. A third pair
//! harvests again with nothing written (a clean block).
//!
//! Not criterion: each harvest consumes the dirty set it measures (both
//! re-protect), and re-dirtying 4 GiB through a guest takes seconds, so a
//! harvest cannot be repeated the thousands of times criterion's sampling
//! asks. Instead: ROUNDS interleaved rounds, medians, and the ratio of the
//! uffd-wp median to KVM's, measured in the same run. A round whose logs
//! disagree (uffd-wp must hold every page KVM saw, plus at most the pages
//! the host wrote: the writer's program) fails the bench (exit status 1).
//!
//! `cargo bench -p ramblock-kvm --bench uffd_wp_harvest [-- ROUNDS]`
use ramblock_core::addr::ByteLen;
use ramblock_core::bitmap::{MigrationBitmap, Owned};
use ramblock_core::block::{BlockBitmaps, BlockSpec};
use ramblock_core::dirty_log::DirtyLogSource;
use ramblock_core::flags::BlockFlags;
use ramblock_core::list::RamList;
use ramblock_core::name::BlockName;
use ramblock_kvm::dirty::BitmapLog;
use ramblock_kvm::guest::PageWriter;
use ramblock_kvm::memslot::BlockRange;
use ramblock_kvm::mode::{DirtyLogMode, DirtyLogRequest};
use ramblock_kvm::vm::VmBuilder;
use ramblock_linux::dirty_log::UffdWpLog;
use ramblock_linux::{LinuxMemory, MemoryBuilder};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const BIG: u64 = 4 << 30;
const FIRST: u64 = 16 << 20;
const MMIO_HOLE: u64 = 0xFEC0_0000;

type List = RamList<'static, LinuxMemory, Owned, 4>;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; a number is the round count.
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    match run(rounds) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uffd_wp_harvest failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(rounds: usize) -> Result<(), String> {
    if std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("skipped: no /dev/kvm");
        return Ok(());
    }
    let mut wp = match UffdWpLog::new() {
        Ok(log) => log,
        Err(e) => {
            println!("skipped: {e}");
            return Ok(());
        }
    };
    let list: &'static List = Box::leak(Box::new(List::new()));
    let spec = BlockSpec::new(BlockName::new("big").unwrap(), ByteLen(BIG))
        .flags(BlockFlags::MIGRATABLE | BlockFlags::NO_RESERVE);
    let mem = MemoryBuilder::anonymous(ByteLen(BIG))
        .no_reserve(true)
        .transparent_hugepages(true)
        .build()
        .map_err(|e| e.to_string())?;
    let bitmaps = BlockBitmaps::for_spec(&spec).unwrap();
    list.add(spec, mem, bitmaps)
        .map_err(|r| r.error.to_string())?;

    let vm = VmBuilder::new()
        .dirty_log(DirtyLogRequest::Mode(DirtyLogMode::Bitmap))
        .build()
        .map_err(|e| e.to_string())?;
    let view = list.read();
    let big = view.by_name("big").unwrap();
    // SAFETY: the list is leaked ('static): the memory outlives the slot.
    let slot = unsafe { vm.map_block(big, 0, BlockRange::Whole) }.map_err(|e| e.to_string())?;
    vm.set_logging(slot, true).map_err(|e| e.to_string())?;
    wp.track(big.offset(), big.memory())
        .map_err(|e| e.to_string())?;
    // The output vector's length (regions per PAGEMAP_SCAN call).
    if let Some(n) = std::env::var("UFFD_WP_SCAN_CAPACITY")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        wp.set_scan_capacity(n);
    }
    let mut kvm = BitmapLog::new(&vm).map_err(|e| e.to_string())?;
    // SAFETY: the block is never removed or shrunk, and the list is leaked.
    let low = unsafe { big.region().detach() };
    let mut writer = PageWriter::new(vm.create_vcpu(0).map_err(|e| e.to_string())?, low)
        .map_err(|e| e.to_string())?;
    let info = big.info();
    let pages = info.used_pages();
    let (mut kvm_words, mut wp_words) = (vec![0u64; pages / 64], vec![0u64; pages / 64]);

    let reachable: Vec<u64> = (FIRST..MMIO_HOLE).step_by(4096).collect();
    let every_100th: Vec<u64> = reachable.iter().copied().step_by(100).collect();
    let cases: [(&str, &[u64]); 3] = [
        ("1% (every 100th page)", &every_100th),
        ("99% (every reachable page)", &reachable),
        ("clean (nothing written)", &[]),
    ];
    // Each round: the guest writes, then both logs are harvested. Round 0
    // is a warm-up (first-touch faults populate the block) and not counted.
    let mut times: Vec<(Vec<Duration>, Vec<Duration>, u64, u64)> = cases
        .iter()
        .map(|_| (Vec::new(), Vec::new(), 0, 0))
        .collect();
    for round in 0..=rounds {
        for (case, &(name, gpas)) in cases.iter().enumerate() {
            let t = Instant::now();
            if !gpas.is_empty() {
                writer
                    .write_pages(&vm, gpas, round as u8)
                    .map_err(|e| e.to_string())?;
            }
            let dirtied = t.elapsed();
            kvm_words.fill(0);
            wp_words.fill(0);
            let mut harvest_kvm = || {
                let mut into = MigrationBitmap::new(&mut kvm_words[..], pages).unwrap();
                let t = Instant::now();
                let n = kvm.harvest(&info, &mut into).map_err(|e| e.to_string())?;
                Ok::<_, String>((t.elapsed(), n))
            };
            let mut harvest_wp = || {
                let mut into = MigrationBitmap::new(&mut wp_words[..], pages).unwrap();
                let t = Instant::now();
                let n = wp.harvest(&info, &mut into).map_err(|e| e.to_string())?;
                Ok::<_, String>((t.elapsed(), n))
            };
            let ((tk, nk), (tw, nw)) = if round % 2 == 0 {
                let k = harvest_kvm()?;
                (k, harvest_wp()?)
            } else {
                let w = harvest_wp()?;
                (harvest_kvm()?, w)
            };
            // uffd-wp holds every page KVM saw; beyond those only pages
            // the host wrote (the writer's program, below FIRST).
            let missing = kvm_words
                .iter()
                .zip(&wp_words)
                .map(|(k, w)| (k & !w).count_ones())
                .sum::<u32>();
            let extra_high = kvm_words
                .iter()
                .zip(&wp_words)
                .enumerate()
                .filter(|&(i, _)| i as u64 * 64 * 4096 >= FIRST)
                .map(|(_, (k, w))| (w & !k).count_ones())
                .sum::<u32>();
            if missing != 0 || extra_high != 0 || nk < gpas.len() as u64 {
                return Err(format!(
                    "round {round}, {name}: KVM saw {nk} pages, uffd-wp {nw}; {missing} missing from uffd-wp, {extra_high} extra above 16 MiB, {} written",
                    gpas.len()
                ));
            }
            println!(
                "round {round} {name}: guest wrote {} pages in {:.0} ms; KVM_GET_DIRTY_LOG {nk} pages {:.3} ms, uffd-wp {nw} pages {:.3} ms",
                gpas.len(),
                ms(dirtied),
                ms(tk),
                ms(tw)
            );
            if round > 0 {
                let entry = &mut times[case];
                entry.0.push(tk);
                entry.1.push(tw);
                entry.2 = nk;
                entry.3 = nw;
            }
        }
    }

    // Phase 2: the memslot gone, host writes dirty the same pages and only
    // the uffd-wp log harvests. With the slot, every re-protecting scan
    // also invalidates KVM's mappings of the range (the MMU notifier);
    // without it, that cost is gone.
    drop(writer);
    vm.unmap(slot).map_err(|e| e.to_string())?;
    let mut host_only: Vec<(Vec<Duration>, u64)> = cases.iter().map(|_| (Vec::new(), 0)).collect();
    for round in 0..=rounds {
        for (case, &(name, gpas)) in cases.iter().enumerate() {
            for &gpa in gpas {
                low.write(ByteLen(gpa), &[round as u8])
                    .map_err(|e| e.to_string())?;
            }
            wp_words.fill(0);
            let mut into = MigrationBitmap::new(&mut wp_words[..], pages).unwrap();
            let t = Instant::now();
            let n = wp.harvest(&info, &mut into).map_err(|e| e.to_string())?;
            let tw = t.elapsed();
            if n != gpas.len() as u64 {
                return Err(format!(
                    "host round {round}, {name}: wrote {} pages, uffd-wp harvested {n}",
                    gpas.len()
                ));
            }
            println!(
                "host round {round} {name}: uffd-wp {n} pages {:.3} ms",
                ms(tw)
            );
            if round > 0 {
                host_only[case].0.push(tw);
                host_only[case].1 = n;
            }
        }
    }

    println!();
    println!("| dirty | pages (KVM / uffd-wp) | KVM_GET_DIRTY_LOG harvest (baseline) | uffd-wp harvest | ratio | uffd-wp, no memslot (host writes) | ratio |");
    println!("|---|---|---|---|---|---|---|");
    for (((name, _), (k, w, nk, nw)), (h, _)) in cases.iter().zip(times).zip(host_only) {
        let (k, w, h) = (median(k), median(w), median(h));
        println!(
            "| {name} | {nk} / {nw} | {:.3} ms | {:.3} ms | {:.2} | {:.3} ms | {:.2} |",
            ms(k),
            ms(w),
            w.as_secs_f64() / k.as_secs_f64(),
            ms(h),
            h.as_secs_f64() / k.as_secs_f64()
        );
    }
    println!("(medians of {rounds} rounds after a warm-up round, 4 GiB block, anonymous memory)");
    Ok(())
}
