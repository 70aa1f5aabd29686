//! `ramblock snapshot`: save the test guest to a file (full, or a parent
//! and a diff after the guest ran on), restore it eagerly, by mapping or
//! lazily and check that its loop continues, inspect a file, merge a chain.

use crate::memory::{guest_ram, GuestRam, Side, RAM_BLOCK};
use crate::options::{parse_backing, parse_size, Backing};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::bitmap::Owned;
use ramblock_core::block::{BlockBitmaps, BlockSpec};
use ramblock_core::flags::BlockFlags;
use ramblock_core::host::HostMemory;
use ramblock_core::list::RamList;
use ramblock_core::name::BlockName;
use ramblock_core::section::SectionName;
use ramblock_core::snapshot::Kind;
use ramblock_kvm::dirty::KvmDirtyLog;
use ramblock_kvm::guest::{check_resumed_increment, Workload};
use ramblock_kvm::memslot::BlockRange;
use ramblock_kvm::mode::{DirtyLogMode, DirtyLogRequest};
use ramblock_kvm::runner::VcpuRunner;
use ramblock_kvm::vcpu_state::VcpuState;
use ramblock_kvm::vm::{Vm, VmBuilder};
use ramblock_linux::snapshot::{
    io::{read_region_at, write_region_at},
    map_block, merge, restore_eager, restore_lazy, verify_block, LazyOptions, RestoreTarget,
    SaveOptions, SaveSection, SnapshotChain, SnapshotFile, Snapshotter,
};
use ramblock_linux::{LinuxMemory, MemoryBuilder, Prealloc};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `ramblock snapshot ...`.
#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Run the test guest, pause it and save it to PATH (with --diff: save
    /// PATH.base, let the guest run on, and save a diff of it at PATH).
    Save(SaveArgs),
    /// Restore PATH (and its parents) into a new VM, run the guest from the
    /// saved vCPU state and check its loop continues.
    Restore(RestoreArgs),
    /// Print a snapshot's header, blocks and sections.
    Inspect {
        /// The snapshot.
        path: PathBuf,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Fold CHILD and its parents into one full snapshot.
    Merge {
        /// The newest file of the chain.
        child: PathBuf,
        /// The file to write.
        #[arg(short, long)]
        output: PathBuf,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
}

/// Options of `ramblock snapshot save`.
#[derive(Args, Debug)]
pub struct SaveArgs {
    /// The file to write.
    pub path: PathBuf,
    /// Save a full snapshot at PATH.base first, then a diff at PATH.
    #[arg(long)]
    pub diff: bool,
    /// Guest RAM size (bytes, or with K/M/G suffix).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub size: u64,
    /// Host memory: anonymous, memfd, hugetlb, or a file path.
    #[arg(long, default_value = "anonymous", value_parser = parse_backing)]
    pub backing: Backing,
    /// Writer threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Write page data with O_DIRECT.
    #[arg(long)]
    pub direct: bool,
    /// With --diff: let the guest run this many milliseconds between the
    /// two snapshots (default: until it completes one more pass).
    #[arg(long, value_name = "MS")]
    pub diff_after_ms: Option<u64>,
    /// Save while the guest runs: pause it for the instant (vCPU state and
    /// write-protection of its RAM), resume it, and write each page as it
    /// was at the instant before the guest's first write to it
    /// (copy-before-write). Then pause it and verify the file against the
    /// guest's RAM at the instant. Not with --diff or --direct.
    #[arg(long, conflicts_with_all = ["diff", "direct"])]
    pub live: bool,
    /// With --live: also time a paused snapshot of the same guest
    /// afterwards (to PATH.paused, removed), for the ratio.
    #[arg(long, requires = "live")]
    pub compare_paused: bool,
    /// With --live: milliseconds over which the guest's loop rate is
    /// measured before the instant.
    #[arg(long, default_value_t = 1000, value_name = "MS", requires = "live")]
    pub rate_window_ms: u64,
    /// Benchmarks: also time a plain single-threaded pwrite loop of the
    /// guest's memory to a file beside PATH (baseline_pwrite_ms).
    #[arg(long, hide = true)]
    pub baseline: bool,
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// How to restore.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Read everything into preallocated memory, then run.
    Eager,
    /// Map the file copy-on-write and run at once.
    Mmap,
    /// Run at once; pages arrive on fault and in the background.
    Lazy,
}

/// Options of `ramblock snapshot restore`.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The snapshot (a diff brings its parents).
    pub path: PathBuf,
    /// How to restore.
    #[arg(long, value_enum, default_value = "eager")]
    pub mode: Mode,
    /// Eager restore threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Benchmarks: with --mode eager, also time a plain single-threaded
    /// read loop of a full snapshot's data into the same memory first
    /// (baseline_read_ms).
    #[arg(long, hide = true)]
    pub baseline: bool,
    /// With --mode lazy: no background prefetch until the guest completed
    /// its loop, so every page it touches faults (measures fault latency).
    #[arg(long)]
    pub no_prefetch: bool,
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs a snapshot command.
pub fn run(cmd: SnapshotCommand) -> ExitCode {
    let (json, result) = match cmd {
        SnapshotCommand::Save(a) if a.live => (a.json, crate::live_snapshot::save_live(&a)),
        SnapshotCommand::Save(a) => (a.json, save(&a)),
        SnapshotCommand::Restore(a) => (a.json, restore(&a)),
        SnapshotCommand::Inspect { path, json } => (json, inspect(&path, json)),
        SnapshotCommand::Merge {
            child,
            output,
            json,
        } => (json, merge_cmd(&child, &output)),
    };
    match result {
        Ok(report) => {
            if json {
                println!("{}", report.json());
            } else {
                print!("{}", report.text());
            }
            if report.verified == Some(false) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            if json {
                println!("{{\"error\":{:?}}}", e);
            }
            eprintln!("ramblock snapshot: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What a command reports.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) fields: Vec<(&'static str, String)>,
    pub(crate) verified: Option<bool>,
    pub(crate) text: String,
}

impl Report {
    pub(crate) fn num(&mut self, key: &'static str, v: impl Into<f64>) {
        let v: f64 = v.into();
        let s = if v.fract() == 0.0 && v.abs() < 1e15 {
            format!("{}", v as i64)
        } else {
            format!("{v:.3}")
        };
        self.fields.push((key, s));
    }

    pub(crate) fn str(&mut self, key: &'static str, v: &str) {
        self.fields.push((key, format!("{v:?}")));
    }

    fn json(&self) -> String {
        let mut o = String::from("{");
        for (i, (k, v)) in self.fields.iter().enumerate() {
            let _ = write!(o, "{}\"{k}\":{v}", if i > 0 { "," } else { "" });
        }
        if let Some(v) = self.verified {
            let _ = write!(o, ",\"verified\":{v}");
        }
        o.push('}');
        o
    }

    fn text(&self) -> String {
        let mut o = self.text.clone();
        for (k, v) in &self.fields {
            let _ = writeln!(o, "{k:<22}{}", v.trim_matches('"'));
        }
        if let Some(v) = self.verified {
            let _ = writeln!(o, "{}", if v { "verified" } else { "NOT verified" });
        }
        o
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A progress bar on stderr for work of `total` bytes, hidden for short
/// work and with --json.
pub(crate) fn bar(total: u64, quiet: bool, what: &str) -> ProgressBar {
    if quiet || total < (256 << 20) {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    pb
}

fn vm() -> Result<Arc<Vm>, String> {
    if !Path::new("/dev/kvm").exists() {
        return Err("no /dev/kvm: snapshots run the KVM test guest".into());
    }
    VmBuilder::new()
        .dirty_log(DirtyLogRequest::Mode(DirtyLogMode::Bitmap))
        .build()
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// Waits until the runner has counted `n` heartbeats (at most `limit`).
fn wait_beats(runner: &VcpuRunner, n: u64, limit: Duration) -> Result<(), String> {
    let start = Instant::now();
    while runner.heartbeats() < n {
        if let Some(e) = runner.error() {
            return Err(format!("the guest stopped: {e}"));
        }
        if start.elapsed() > limit {
            return Err(format!("the guest made no full pass in {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// The vCPU state section a snapshot of the test guest carries.
pub(crate) fn cpu_section(state: &[u8]) -> SaveSection<'_> {
    SaveSection {
        name: SectionName::new("cpu").expect("valid"),
        instance_id: 0,
        version: 1,
        bytes: state,
    }
}

/// `path` with `suffix` appended to its file name (`g.snap` -> `g.snap.base`).
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// The test guest to save, running.
pub(crate) struct SaveGuest {
    /// Its RAM (one block, `pc.ram`).
    pub ram: &'static GuestRam,
    /// Its VM.
    pub vm: Arc<Vm>,
    /// Its vCPU.
    pub runner: VcpuRunner,
    /// Its loop.
    pub work: Workload,
}

/// Builds `a.size` bytes of guest RAM over `a.backing`, maps it, starts
/// the increment loop and waits until it wrote all its memory once; KVM's
/// dirty log is switched on for the block when `log` (for diffs).
pub(crate) fn start_save_guest(a: &SaveArgs, log: bool) -> Result<SaveGuest, String> {
    let ram: &'static GuestRam = guest_ram(
        a.size,
        &a.backing,
        18,
        Side::Source,
        DirtyLogRequest::Mode(DirtyLogMode::Bitmap),
    )?;
    let vm = vm()?;
    let view = ram.read();
    let block = view.by_name(RAM_BLOCK).ok_or("no guest RAM block")?;
    // SAFETY: `ram` is leaked ('static) and its block never removed, so the
    // memory behind the slot outlives the VM.
    unsafe { vm.map_block(block, 0, BlockRange::Whole) }.map_err(|e| e.to_string())?;
    if log {
        vm.set_block_logging(block.offset(), true)
            .map_err(|e| e.to_string())?;
    }
    let work = Workload::for_ram(a.size).map_err(|e| e.to_string())?;
    let vcpu = vm.create_vcpu(0).map_err(|e| e.to_string())?;
    work.load(&block.region(), &vcpu)
        .map_err(|e| e.to_string())?;
    let runner = VcpuRunner::spawn(vm.clone(), vcpu).map_err(|e| e.to_string())?;
    // One whole pass: the guest wrote all its memory.
    wait_beats(&runner, 1, pass_limit(a.size))?;
    Ok(SaveGuest {
        ram,
        vm,
        runner,
        work,
    })
}

/// The longest a guest of `size` bytes may take for a pass.
fn pass_limit(size: u64) -> Duration {
    Duration::from_secs(20) * (1 + size.div_ceil(1 << 30) as u32)
}

fn save(a: &SaveArgs) -> Result<Report, String> {
    let SaveGuest {
        ram, vm, runner, ..
    } = start_save_guest(a, true)?;
    let view = ram.read();
    let block = view.by_name(RAM_BLOCK).ok_or("no guest RAM block")?;
    runner.pause();
    let mut log = KvmDirtyLog::new(&vm);
    let mut snap = Snapshotter::new();
    let options = SaveOptions {
        threads: a.threads.max(1),
        direct: a.direct,
        sync: false,
    };
    let mut report = Report::default();
    let mut one = |path: &Path, diff: bool, snap: &mut Snapshotter| {
        let state = runner.snapshot().map_err(|e| e.to_string())?.to_bytes();
        let sections = [cpu_section(&state)];
        let pb = bar(a.size, a.json, if diff { "saving diff" } else { "saving" });
        let s = snap
            .save(path, &[block], &mut log, &sections, diff, options, &|n| {
                pb.set_position(n)
            })
            .map_err(|e| e.to_string())?;
        pb.finish_and_clear();
        Ok::<_, String>(s)
    };
    let full_path = if a.diff {
        with_suffix(&a.path, ".base")
    } else {
        a.path.clone()
    };
    let full = one(&full_path, false, &mut snap)?;
    let saved = if a.diff {
        // The guest runs on: about one more pass.
        runner.resume();
        match a.diff_after_ms {
            Some(ms) => std::thread::sleep(Duration::from_millis(ms)),
            None => {
                let beats = runner.heartbeats();
                wait_beats(&runner, beats + 1, pass_limit(a.size))?;
            }
        }
        runner.pause();
        let diff = one(&a.path, true, &mut snap)?;
        report.num("full_bytes_written", full.bytes_written as f64);
        report.num("full_save_ms", ms(full.elapsed));
        diff
    } else {
        full
    };
    let blocks_on_disk = std::fs::metadata(&a.path).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    });
    report.text = format!(
        "saved {} MiB guest ({}) to {}\n",
        a.size >> 20,
        if a.diff { "diff" } else { "full" },
        a.path.display()
    );
    report.str("path", &a.path.display().to_string());
    report.num("bytes_written", saved.bytes_written as f64);
    report.num("bytes_on_disk", blocks_on_disk.unwrap_or(0) as f64);
    report.num("pages_held", saved.pages_held as f64);
    report.num("zero_pages", saved.zero_pages as f64);
    report.num("save_ms", ms(saved.elapsed));
    report.num(
        "save_mib_s",
        (saved.bytes_written as f64 / (1 << 20) as f64) / saved.elapsed.as_secs_f64().max(1e-9),
    );
    report.num("guest_passes", runner.heartbeats() as f64);
    if a.baseline {
        let p = with_suffix(&a.path, ".baseline");
        let t = baseline_pwrite(&p, &block.region())?;
        report.num("baseline_pwrite_ms", ms(t));
        report.num(
            "baseline_mib_s",
            (a.size as f64 / (1 << 20) as f64) / t.as_secs_f64().max(1e-9),
        );
    }
    // The file holds what the paused guest's memory holds.
    let chain = SnapshotChain::open(&a.path).map_err(|e| e.to_string())?;
    let ok = verify_block(&chain, RAM_BLOCK, &block.region()).is_ok()
        && chain.files().iter().all(|f| f.verify_data().is_ok());
    report.verified = Some(ok);
    let _ = vm.set_block_logging(block.offset(), false);
    let _ = runner.stop();
    Ok(report)
}

/// A plain loop: one thread, `pwrite` of 4 MiB at a time straight from
/// guest memory, to a new file at `path` (removed afterwards).
fn baseline_pwrite(
    path: &Path,
    region: &ramblock_core::region::HostRegion<'_>,
) -> Result<Duration, String> {
    let t = Instant::now();
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    in_chunks(region, |sub, at| write_region_at(&file, sub, at))?;
    let elapsed = t.elapsed();
    let _ = std::fs::remove_file(path);
    Ok(elapsed)
}

/// A plain loop: one thread, `pread` of 4 MiB at a time of the block's data
/// in `file` straight into `region`.
fn baseline_read(
    file: &SnapshotFile,
    region: &ramblock_core::region::HostRegion<'_>,
) -> Result<Duration, String> {
    let t = Instant::now();
    let data = file.blocks()[0].data_offset;
    in_chunks(region, |sub, at| {
        read_region_at(file.file(), sub, data + at)
    })?;
    Ok(t.elapsed())
}

/// The baselines' plain loop: calls `each` on every 4 MiB piece of
/// `region` in order, with the piece's offset in the region.
fn in_chunks(
    region: &ramblock_core::region::HostRegion<'_>,
    mut each: impl FnMut(&ramblock_core::region::HostRegion<'_>, u64) -> std::io::Result<()>,
) -> Result<(), String> {
    let chunk = 4usize << 20;
    let mut at = 0usize;
    while at < region.len() {
        let n = chunk.min(region.len() - at);
        let sub = region
            .subregion(ByteLen(at as u64), n)
            .map_err(|e| e.to_string())?;
        each(&sub, at as u64).map_err(|e| e.to_string())?;
        at += n;
    }
    Ok(())
}

/// Fresh memory for block `len` bytes with `page` pages, preallocated or not.
pub(crate) fn fresh_memory(
    len: u64,
    page: PageSize,
    prealloc: bool,
) -> Result<LinuxMemory, String> {
    let b = if page == PageSize::SIZE_4K {
        MemoryBuilder::anonymous(ByteLen(len))
    } else {
        MemoryBuilder::hugetlb(ByteLen(len), page)
    };
    let b = if prealloc {
        b.prealloc(Prealloc::default())
    } else {
        b
    };
    b.build().map_err(|e| e.to_string())
}

fn list_of(mem: LinuxMemory) -> Result<&'static GuestRam, String> {
    let len = mem.used_len();
    let spec = BlockSpec::new(BlockName::new(RAM_BLOCK).expect("valid"), len)
        .flags(BlockFlags::MIGRATABLE | mem.flags());
    let bitmaps = BlockBitmaps::<Owned>::for_spec(&spec).map_err(|e| e.to_string())?;
    let list: &'static GuestRam = Box::leak(Box::new(RamList::new()));
    list.add(spec, mem, bitmaps).map_err(|e| e.to_string())?;
    Ok(list)
}

fn restore(a: &RestoreArgs) -> Result<Report, String> {
    let chain = SnapshotChain::open(&a.path).map_err(|e| e.to_string())?;
    let i = chain
        .newest()
        .find_block(RAM_BLOCK)
        .ok_or("the snapshot has no pc.ram block")?;
    let entry = chain.blocks()[i].clone();
    let len = entry.used_length.0;
    let state = chain
        .newest()
        .section("cpu", 0)
        .ok_or("the snapshot has no cpu section")?;
    let state = VcpuState::from_bytes(state).map_err(|e| e.to_string())?;
    let work = Workload::for_ram(len).map_err(|e| e.to_string())?;
    let next = work.next_page_index(&state).map_err(|e| e.to_string())?;
    // The reference the restored guest is checked against: the snapshot
    // read into memory of its own, and checked against its checksum.
    let reference = fresh_memory(len, entry.page_size, false)?;
    let target = RestoreTarget {
        name: RAM_BLOCK,
        region: reference.region(),
        page_size: reference.page_size(),
    };
    restore_eager(&chain, &[target], a.threads, &|_| {}).map_err(|e| e.to_string())?;
    let content_ok = verify_block(&chain, RAM_BLOCK, &reference.region()).is_ok();
    let vm = vm()?;
    let mut report = Report::default();
    let t0;
    let restore_time;
    let mut first = Duration::ZERO;
    let mut one_loop = Duration::ZERO;
    let mut faults = 0u64;
    let mut p50 = Duration::ZERO;
    let mut p99 = Duration::ZERO;
    // The VM and its vCPU are made before the clock starts, as a VMM
    // prepares a destination before an incoming migration: restoring is
    // mapping the memory, loading the registers and running.
    let vcpu = vm.create_vcpu(0).map_err(|e| e.to_string())?;
    let start_guest =
        move |ram: &'static GuestRam, t0: Instant| -> Result<(VcpuRunner, Duration), String> {
            let view = ram.read();
            let block = view.by_name(RAM_BLOCK).ok_or("no guest RAM block")?;
            // SAFETY: `ram` is leaked and its block never removed.
            unsafe { vm.map_block(block, 0, BlockRange::Whole) }.map_err(|e| e.to_string())?;
            vcpu.restore(&state).map_err(|e| e.to_string())?;
            let runner = VcpuRunner::spawn(vm.clone(), vcpu).map_err(|e| e.to_string())?;
            Ok((runner, t0.elapsed()))
        };
    // The first loop after a restore faults every page in: an mmap restore
    // takes about 8 s per GiB here, so the wait grows with the guest.
    let limit = Duration::from_secs(30) * (1 + len.div_ceil(1 << 30) as u32);
    let ram = match a.mode {
        Mode::Eager => {
            // Preallocation is preparation, before the clock starts.
            let mem = fresh_memory(len, entry.page_size, true)?;
            let ram = list_of(mem)?;
            if a.baseline {
                let view = ram.read();
                let b = view.by_name(RAM_BLOCK).ok_or("no block")?;
                let t = baseline_read(chain.files().last().expect("not empty"), &b.region())?;
                report.num("baseline_read_ms", ms(t));
            }
            t0 = Instant::now();
            {
                let view = ram.read();
                let b = view.by_name(RAM_BLOCK).ok_or("no block")?;
                let pb = bar(len, a.json, "restoring");
                let target = RestoreTarget {
                    name: RAM_BLOCK,
                    region: b.region(),
                    page_size: b.page_size(),
                };
                restore_eager(&chain, &[target], a.threads, &|n| pb.set_position(n))
                    .map_err(|e| e.to_string())?;
                pb.finish_and_clear();
            }
            restore_time = t0.elapsed();
            let (runner, f) = start_guest(ram, t0)?;
            first = f;
            wait_beats(&runner, 1, limit)?;
            one_loop = t0.elapsed();
            runner.pause();
            let _ = runner.stop();
            ram
        }
        Mode::Mmap => {
            t0 = Instant::now();
            let mem = map_block(&chain, RAM_BLOCK).map_err(|e| e.to_string())?;
            let ram = list_of(mem)?;
            restore_time = t0.elapsed();
            let (runner, f) = start_guest(ram, t0)?;
            first = f;
            wait_beats(&runner, 1, limit)?;
            one_loop = t0.elapsed();
            runner.pause();
            let _ = runner.stop();
            ram
        }
        Mode::Lazy => {
            let mem = fresh_memory(len, entry.page_size, false)?;
            let ram = list_of(mem)?;
            t0 = Instant::now();
            let view = ram.read();
            let b = view.by_name(RAM_BLOCK).ok_or("no block")?;
            let (result, stats) = restore_lazy(
                &chain,
                &[(RAM_BLOCK, b.memory())],
                LazyOptions {
                    prefetch: !a.no_prefetch,
                },
                |_| {
                    let (runner, f) = start_guest(ram, t0)?;
                    first = f;
                    let r = wait_beats(&runner, 1, limit);
                    one_loop = t0.elapsed();
                    runner.pause();
                    let _ = runner.stop();
                    r
                },
            )
            .map_err(|e| e.to_string())?;
            result?;
            restore_time = stats.elapsed;
            faults = stats.faults;
            p50 = stats.fault_p50;
            p99 = stats.fault_p99;
            drop(view);
            ram
        }
    };
    let view = ram.read();
    let b = view.by_name(RAM_BLOCK).ok_or("no block")?;
    let check = check_resumed_increment(&reference.region(), &b.region(), &work, next);
    report.text = format!(
        "restored {} MiB from {} ({} file{}, {:?})\n",
        len >> 20,
        a.path.display(),
        chain.files().len(),
        if chain.files().len() == 1 { "" } else { "s" },
        a.mode
    );
    if let Err(e) = &check {
        eprintln!("restored guest: {e}");
    }
    report.str("mode", &format!("{:?}", a.mode).to_lowercase());
    report.num("files", chain.files().len() as f64);
    report.num("restore_ms", ms(restore_time));
    report.num("first_instruction_ms", ms(first));
    report.num("one_loop_ms", ms(one_loop));
    report.num("faults", faults as f64);
    report.num("fault_p50_us", p50.as_micros() as f64);
    report.num("fault_p99_us", p99.as_micros() as f64);
    if let Ok(d) = &check {
        report.num("guest_passes_after_restore", f64::from(d.full_passes));
    }
    report.verified = Some(content_ok && check.is_ok());
    Ok(report)
}

fn inspect(path: &Path, json: bool) -> Result<Report, String> {
    let f = SnapshotFile::open(path).map_err(|e| e.to_string())?;
    let h = f.header();
    let mut r = Report::default();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    r.str("path", &path.display().to_string());
    r.str("kind", if f.is_diff() { "diff" } else { "full" });
    r.str("file_id", &hex(&h.file_id));
    if let Kind::Diff(p) = h.kind {
        r.str("parent_id", &hex(&p.id));
        r.str("parent_checksum", &format!("{:#018x}", p.checksum));
    }
    r.str("meta_checksum", &format!("{:#018x}", h.meta_checksum));
    r.num("meta_len", h.meta_len as f64);
    r.num("file_len", h.data_end as f64);
    let blocks: Vec<String> = f
        .blocks()
        .iter()
        .map(|b| {
            format!(
                "{{\"name\":{:?},\"used_length\":{},\"page_size\":{},\"data_offset\":{},\"held_pages\":{},\"content_checksum\":\"{:#018x}\",\"data_checksum\":\"{:#018x}\"}}",
                b.name.as_str(), b.used_length.0, b.page_size.bytes(), b.data_offset, b.held_pages, b.content_checksum, b.data_checksum
            )
        })
        .collect();
    let sections: Vec<String> = f
        .sections()
        .iter()
        .map(|s| {
            format!(
                "{{\"name\":{:?},\"instance_id\":{},\"version\":{},\"len\":{}}}",
                s.header.name.as_str(),
                s.header.instance_id,
                s.header.version,
                s.header.len
            )
        })
        .collect();
    if json {
        r.fields.push(("blocks", format!("[{}]", blocks.join(","))));
        r.fields
            .push(("sections", format!("[{}]", sections.join(","))));
    } else {
        for b in f.blocks() {
            let _ = writeln!(
                r.text,
                "block {:?}: {} MiB, {} pages, {} held, data at {:#x}, content {:#018x}",
                b.name.as_str(),
                b.used_length.0 >> 20,
                b.page_size,
                b.held_pages,
                b.data_offset,
                b.content_checksum
            );
        }
        for s in f.sections() {
            let _ = writeln!(
                r.text,
                "section {:?} instance {} version {}: {} bytes",
                s.header.name.as_str(),
                s.header.instance_id,
                s.header.version,
                s.header.len
            );
        }
    }
    Ok(r)
}

fn merge_cmd(child: &Path, out: &Path) -> Result<Report, String> {
    let chain = SnapshotChain::open(child).map_err(|e| e.to_string())?;
    let s = merge(&chain, out).map_err(|e| e.to_string())?;
    let merged = SnapshotFile::open(out).map_err(|e| e.to_string())?;
    let mut r = Report {
        text: format!(
            "merged {} files into {}\n",
            chain.files().len(),
            out.display()
        ),
        ..Report::default()
    };
    r.num("files", chain.files().len() as f64);
    r.num("bytes_written", s.bytes_written as f64);
    r.num("merge_ms", ms(s.elapsed));
    r.verified = Some(merged.verify_data().is_ok());
    Ok(r)
}
