//! `ramblock`: live-migrate a running guest's RAM.
//!
//! `ramblock migrate` with no arguments runs the whole job on one machine: a
//! 1 GiB KVM guest whose vCPU increments a byte in every page from 1 MiB up,
//! a destination in the same process over a loopback TCP connection, the best
//! dirty-log mode the host offers, and a byte-for-byte check of the
//! destination against the source at switch-over. `--incoming` and `--to`
//! split the two sides over TCP. Without `/dev/kvm` a host thread writes
//! guest RAM through the block API instead (behind its back with
//! `--dirty-log uffd-wp`, whose write-protect tracker then sees the writes).

mod destination;
mod kvm;
mod link;
mod live_snapshot;
mod local;
mod memory;
mod options;
mod report;
mod snapshot;
mod source;
mod tracker;
mod workload;

use clap::{Parser, Subcommand};
use destination::{Channels, Incoming, StartGuest};
use memory::{first_mismatch, guest_ram, GuestRam, Side, RAM_BLOCK};
use options::{Backing, DirtyLog, MigrateOptions};
use ramblock_core::dirty_log::SoftwareOnly;
use ramblock_core::migrate::PostcopyStats;
use ramblock_kvm::guest::ResumeMismatch;
use ramblock_linux::transport::tls::TlsConfig;
use ramblock_linux::transport::{Conn, Connector, Listener, Timeouts};
use report::Summary;
use source::Sent;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use workload::{Guest, HostWriter};

/// A destination VM's dirty-log mode: it logs nothing during the
/// migration, so the plainest mode.
pub const DESTINATION_LOG: ramblock_kvm::mode::DirtyLogRequest =
    ramblock_kvm::mode::DirtyLogRequest::Mode(ramblock_kvm::mode::DirtyLogMode::Bitmap);

/// Guest RAM management for Rust VMMs.
#[derive(Parser, Debug)]
#[command(name = "ramblock", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Live-migrate a running guest's RAM (both sides in one process unless
    /// --incoming or --to is given).
    Migrate(MigrateOptions),
    /// Save the test guest to a snapshot file, restore it, inspect or
    /// merge snapshot files.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
}

fn main() -> ExitCode {
    let mut opts = match Cli::parse().command {
        Command::Migrate(opts) => opts,
        Command::Snapshot(cmd) => return snapshot::run(cmd),
    };
    if opts.local && opts.backing == Backing::Hugetlb {
        // Anonymous hugetlb memory has no fd another process could map.
        opts.backing = Backing::HugetlbMemfd;
    }
    let summary = if opts.local {
        local_update(&opts)
    } else if let Some(addr) = opts.incoming.clone() {
        incoming(&opts, &addr)
    } else {
        outgoing(&opts)
    };
    if opts.json {
        println!("{}", summary.json());
    } else {
        print!("{}", summary.text());
    }
    if summary.error.is_none() && summary.verified != Some(false) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn backing_name(opts: &MigrateOptions) -> String {
    match &opts.backing {
        options::Backing::Anonymous => "anonymous".into(),
        options::Backing::Memfd => "memfd".into(),
        options::Backing::Hugetlb => "hugetlb 2M".into(),
        options::Backing::HugetlbMemfd => "hugetlb memfd 2M".into(),
        options::Backing::File(p) => format!("file {}", p.display()),
        options::Backing::GuestMemfd => "guest_memfd".into(),
    }
}

/// The TLS credentials of --tls-cert, --tls-key and --tls-ca, if given.
fn tls(opts: &MigrateOptions) -> Result<Option<TlsConfig>, String> {
    match (&opts.tls_cert, &opts.tls_key, &opts.tls_ca) {
        (Some(cert), Some(key), Some(ca)) => TlsConfig::from_pem_files(cert, key, ca)
            .map(Some)
            .map_err(|e| e.to_string()),
        _ => Ok(None),
    }
}

/// A destination's listener on `addr`: the handshake timeout of the
/// options, TLS if configured, and a line on stderr for every peer it
/// drops.
fn listen(addr: &str, opts: &MigrateOptions) -> Result<Listener, String> {
    let mut listener = Listener::bind(addr)
        .map_err(|e| e.to_string())?
        .with_timeouts(Timeouts {
            handshake: Duration::from_millis(opts.handshake_timeout_ms.max(1)),
            read: Some(opts.peer_timeout()),
            write: Some(opts.peer_timeout()),
        })
        .with_log(|dropped| eprintln!("ramblock: {dropped}"));
    if let Some(tls) = tls(opts)? {
        listener = listener.with_tls(tls);
    }
    Ok(listener)
}

/// The source's way to `addr`, with TLS if configured.
fn connector(addr: &str, opts: &MigrateOptions) -> Result<Connector, String> {
    let mut connector = Connector::new(addr).write_timeout(Some(opts.peer_timeout()));
    if let Some(tls) = tls(opts)? {
        connector = connector.with_tls(tls);
    }
    Ok(connector)
}

/// `--local`: a local live update, in one process (the destination in a
/// thread, over a socket pair) or, with `--to`/`--incoming unix:PATH`,
/// between two.
fn local_update(opts: &MigrateOptions) -> Summary {
    let mut summary = Summary {
        role: match (&opts.incoming, &opts.to) {
            (Some(_), _) => "destination",
            (None, Some(_)) => "source",
            (None, None) => "local",
        },
        size: opts.size,
        backing: if opts.incoming.is_some() {
            "the source's fds".into()
        } else {
            backing_name(opts)
        },
        mode: "local (fd passing)".into(),
        local: true,
        ..Summary::default()
    };
    if let Err(e) = opts.source_channels() {
        return failed(summary, e);
    }
    let unix_path = |addr: &String| {
        addr.strip_prefix("unix:")
            .map(std::path::PathBuf::from)
            .ok_or_else(|| {
                format!("--local moves guest RAM over a UNIX socket: give unix:PATH, not {addr:?}")
            })
    };
    if let Some(addr) = &opts.incoming {
        let result = unix_path(addr).and_then(|path| {
            // A socket file left by an earlier run would make bind fail.
            if std::fs::symlink_metadata(&path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            {
                let _ = std::fs::remove_file(&path);
            }
            let listener = std::os::unix::net::UnixListener::bind(&path)
                .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
            if !opts.json {
                eprintln!("waiting for a local update on {}", path.display());
            }
            let (sock, _) = listener.accept().map_err(|e| e.to_string())?;
            let _ = std::fs::remove_file(&path);
            local::receive(&sock, opts)
        });
        return match result {
            Ok(r) => {
                local_destination_summary(&mut summary, &r, r.state_at);
                summary
            }
            Err(e) => failed(summary, e),
        };
    }
    if !kvm_present(opts) || opts.workload != options::Workload::Increment {
        return failed(
            summary,
            "--local hands a running KVM guest over: it needs /dev/kvm and --workload increment"
                .into(),
        );
    }
    let ram = match guest_ram(
        opts.size,
        &opts.backing,
        opts.clear_shift,
        Side::Source,
        DESTINATION_LOG,
    ) {
        Ok(r) => r,
        Err(e) => return failed(summary, e),
    };
    // Before the guest starts: anonymous memory is refused at once.
    if let Err(e) = local::check_shareable(ram) {
        return failed(summary, e);
    }
    let mut k = match kvm::start(ram, opts) {
        Ok(k) => k,
        Err(e) => return failed(summary, e),
    };
    let result = local_source(ram, opts, &mut summary, k.guest.as_mut());
    k.guest.stop();
    match result {
        Ok(()) => summary,
        Err(e) => failed(summary, e),
    }
}

/// The source of a local update: to `--to unix:PATH`, or to a destination
/// thread.
fn local_source(
    ram: &'static GuestRam,
    opts: &MigrateOptions,
    summary: &mut Summary,
    guest: &mut dyn Guest,
) -> Result<(), String> {
    summary.guest_rate_before = warm_up(guest, opts)?;
    let start_progress = guest.progress();
    let t0 = Instant::now();
    let (sent, received) = match &opts.to {
        Some(addr) => {
            let path = addr.strip_prefix("unix:").ok_or_else(|| {
                format!("--local moves guest RAM over a UNIX socket: give unix:PATH, not {addr:?}")
            })?;
            let deadline = Instant::now() + Duration::from_secs(10);
            let sock = loop {
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(s) => break s,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    Err(e) => return Err(format!("cannot connect to {path}: {e}")),
                }
            };
            (local::send(ram, guest, &sock, opts)?, None)
        }
        None => {
            let (ours, theirs) =
                std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
            let dest_opts = opts.clone();
            let dest = std::thread::spawn(move || local::receive(&theirs, &dest_opts));
            let sent = local::send(ram, guest, &ours, opts);
            // A source that failed closes its end, so the destination
            // thread sees the end of the stream instead of waiting.
            drop(ours);
            let received = dest
                .join()
                .map_err(|_| "the destination thread panicked".to_string())?;
            let sent = sent.map_err(|e| match &received {
                Err(d) => format!("{e} ({d})"),
                Ok(_) => e,
            })?;
            (sent, Some(received?))
        }
    };
    summary.guest_progress = guest.progress() - start_progress;
    let end = received.as_ref().map_or(sent.running_ack, |r| r.running_at);
    summary.stats.total_ns = end.duration_since(t0).as_nanos() as u64;
    summary.stats.downtime_ns = end.duration_since(sent.paused_at).as_nanos() as u64;
    summary.stats.bytes = sent.bytes;
    summary.prepare_ns = Some(sent.prepare_ns);
    summary.switchover_ns = Some(end.duration_since(sent.paused_at).as_nanos() as u64);
    match received {
        Some(r) => local_destination_summary(summary, &r, sent.paused_at),
        // The destination said it runs; its own summary says how well.
        None => summary.verified = Some(true),
    }
    Ok(())
}

/// The destination's findings in `summary`; `switched` is the switch-over
/// instant the two-loop time counts from.
fn local_destination_summary(summary: &mut Summary, r: &local::LocalReceived, switched: Instant) {
    if summary.role == "destination" {
        summary.prepare_ns = Some(r.prepare_ns);
        summary.stats.downtime_ns = r.running_at.duration_since(r.state_at).as_nanos() as u64;
    }
    summary.prefault_ns = Some(r.prefault_ns);
    summary.dest_two_loops_ns = r
        .two_loops_at
        .map(|t| t.duration_since(switched).as_nanos() as u64);
    summary.destination_progress = Some(r.progress);
    summary.destination_ran = Some(r.ran);
    summary.verified = Some(r.ran);
    if let Some(f) = &r.failure {
        eprintln!("local update: {f}");
        summary.mismatch = Some((RAM_BLOCK.to_string(), 0));
    }
}

fn failed(mut summary: Summary, error: String) -> Summary {
    summary.error = Some(error);
    summary
}

/// The destination of `--incoming`: listen, receive one migration, verify
/// the end checksums.
fn incoming(opts: &MigrateOptions, addr: &str) -> Summary {
    let mut summary = Summary {
        role: "destination",
        size: opts.size,
        backing: backing_name(opts),
        mode: "-".into(),
        ..Summary::default()
    };
    if let Err(e) = opts.postcopy_fits_backing() {
        return failed(summary, e);
    }
    let side = if opts.postcopy.is_some() || opts.lazy_destination {
        Side::LazyDestination
    } else {
        Side::Destination
    };
    let ram = match guest_ram(
        opts.size,
        &opts.backing,
        opts.clear_shift,
        side,
        DESTINATION_LOG,
    ) {
        Ok(r) => r,
        Err(e) => return failed(summary, e),
    };
    let start_guest = match postcopy_guest(ram, opts) {
        Ok(s) => s,
        Err(e) => return failed(summary, e),
    };
    // Pre-copy on KVM: a vCPU of a VM over this RAM, made now, so the
    // switch-over only loads the shipped `cpu` section into it and runs it
    // before this side confirms the handover.
    let precopy_guest = if start_guest.is_none() && kvm_present(opts) {
        match kvm::prepare_destination(ram) {
            Ok(s) => Some(s),
            Err(e) => return failed(summary, e),
        }
    } else {
        None
    };
    let listener = match listen(addr, opts) {
        Ok(l) => Arc::new(l),
        Err(e) => return failed(summary, e),
    };
    if !opts.json {
        eprintln!("waiting for a migration on {addr}");
    }
    // Peers that are not the source are dropped (and logged) meanwhile.
    let conn = match listener.accept_migration(None) {
        Ok(c) => c,
        Err(e) => return failed(summary, format!("on {addr}: {e}")),
    };
    let t0 = Instant::now();
    // A named file may hold data already; every other backing starts zero.
    let fresh = !matches!(&opts.backing, Backing::File(p) if !p.is_dir());
    let how = Incoming {
        fresh,
        postcopy: start_guest,
        resume: opts.resume.then(|| listener.clone()),
        precopy: precopy_guest,
        refuse_section: opts.refuse_section.clone(),
        channels: Some(Channels {
            listener: listener.clone(),
            expect: opts.channels,
        }),
    };
    match destination::receive(ram, conn, how) {
        Ok(r) => {
            summary.stats.total_ns = t0.elapsed().as_nanos() as u64;
            summary.stats.pages = r.summary.pages;
            summary.stats.zero_pages = r.summary.zero_pages;
            summary.stats.passes = r.summary.passes;
            summary.fault_latency = r.latency;
            summary.resumes = r.resumes;
            summary.page_channels = Some(r.page_channels);
            if r.summary.postcopy_pages > 0 || r.summary.discarded > 0 {
                // This side's view: what it dropped, what it placed after
                // the guest started here (the source splits the latter into
                // requested and background pages).
                summary.stats.postcopy = Some(PostcopyStats {
                    discarded: r.summary.discarded,
                    requests: r.latency.map_or(0, |l| l.faults),
                    background_pages: r.summary.postcopy_pages,
                    resumes: r.resumes,
                    ..PostcopyStats::default()
                });
            }
            summary.verified = Some(true);
            if let Some(mut guest) = r.guest {
                if !r.summary.postcopy {
                    // Pre-copy: the vCPU runs from the shipped `cpu`
                    // section; it must go on with the source's loop.
                    let ran = destination_continues(guest.as_mut());
                    if let Err(e) = &ran {
                        eprintln!("{e}");
                    }
                    summary.destination_ran = Some(ran.is_ok());
                    summary.verified = Some(ran.is_ok());
                }
                // The guest runs here now; this program only demonstrates
                // the move, so it stops it once the memory is verified.
                summary.guest_progress = guest.progress();
                guest.stop();
            }
            summary
        }
        Err(e) => failed(summary, e),
    }
}

/// How a post-copy destination starts the guest: a KVM vCPU loaded with
/// the source's registers (prepared now, before the migration), or nothing
/// without KVM (the source's writer was a host thread).
fn postcopy_guest(
    ram: &'static GuestRam,
    opts: &MigrateOptions,
) -> Result<Option<StartGuest>, String> {
    if opts.postcopy.is_none() {
        return Ok(None);
    }
    if opts.no_kvm || !std::path::Path::new("/dev/kvm").exists() {
        return Ok(Some(Box::new(|_: &[u8]| {
            Ok(Box::new(workload::NoGuest) as Box<dyn workload::Guest>)
        })));
    }
    kvm::prepare_destination(ram).map(Some)
}

/// The source: start the guest, then migrate it to `--to` or to a local
/// destination.
fn outgoing(opts: &MigrateOptions) -> Summary {
    let mut summary = Summary {
        role: if opts.to.is_some() { "source" } else { "local" },
        size: opts.size,
        backing: backing_name(opts),
        ..Summary::default()
    };
    // From here on `channels` is the count the source opens.
    let opts = &match opts.source_channels() {
        Ok(n) => MigrateOptions {
            channels: Some(n),
            ..opts.clone()
        },
        Err(e) => return failed(summary, e),
    };
    summary.page_channels = opts.channels;
    if let Err(e) = opts.postcopy_fits_backing() {
        return failed(summary, e);
    }
    let ram = match guest_ram(
        opts.size,
        &opts.backing,
        opts.clear_shift,
        Side::Source,
        opts.dirty_log.kvm_request(),
    ) {
        Ok(r) => r,
        Err(e) => return failed(summary, e),
    };
    let kvm = if opts.no_kvm {
        None
    } else if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!(
            "no /dev/kvm: a host thread writes guest RAM through the block API instead of a vCPU"
        );
        None
    } else {
        match kvm::start(ram, opts) {
            Ok(k) => Some(k),
            Err(e) => return failed(summary, e),
        }
    };
    let result = match kvm {
        Some(mut k) => {
            summary.mode = k.mode_name(opts);
            let vm = k.vm.clone();
            let r = run_source(
                ram,
                opts,
                &mut summary,
                k.guest.as_mut(),
                |ram, guest, conn, to| kvm::send(&vm, ram, guest, conn, to, opts),
            );
            k.guest.stop();
            r
        }
        None => {
            let uffd_wp = opts.dirty_log == DirtyLog::UffdWp;
            summary.mode = if uffd_wp { "uffd-wp" } else { "software" }.into();
            // With uffd-wp the writer bypasses the block API (as an
            // emulator's vCPU would), so only the tracker sees its writes.
            let mut writer: Box<dyn Guest> =
                Box::new(HostWriter::start(ram, opts.workload, uffd_wp));
            let r = run_source(
                ram,
                opts,
                &mut summary,
                writer.as_mut(),
                |ram, guest, conn, to| {
                    if uffd_wp {
                        let mut log = tracker::uffd_wp_log(ram)?;
                        source::send(ram, &mut log, guest, conn, to, opts)
                    } else {
                        source::send(ram, &mut SoftwareOnly, guest, conn, to, opts)
                    }
                },
            );
            writer.stop();
            r
        }
    };
    match result {
        Ok(()) => summary,
        Err(e) => failed(summary, e),
    }
}

/// Lets the guest fill its memory, connects, migrates and verifies.
fn run_source(
    ram: &'static GuestRam,
    opts: &MigrateOptions,
    summary: &mut Summary,
    guest: &mut dyn Guest,
    mut send: impl FnMut(&GuestRam, &mut dyn Guest, Conn, &Connector) -> Result<Sent, String>,
) -> Result<(), String> {
    summary.guest_rate_before = warm_up(guest, opts)?;
    let start_progress = guest.progress();
    if let Some(addr) = &opts.to {
        let to = connector(addr, opts)?;
        let conn = to.connect().map_err(|e| e.to_string())?;
        let result = send(ram, guest, conn, &to);
        summary.guest_progress = guest.progress() - start_progress;
        let sent = result.map_err(|e| still_running(e, guest, opts))?;
        summary.stats = sent.stats;
        summary.pass0_bandwidth = sent.pass0_bandwidth;
        summary.passes = sent.passes;
        summary.zero_copy = sent.zero_copy;
        if !sent.device_state.is_empty() && sent.stats.postcopy.is_none() {
            // A vCPU went: the downtime ran until the destination said it
            // runs there; the RAM-only part beside it.
            summary.ram_downtime_ns = Some(sent.stats.ram_downtime_ns);
        }
        summary.verified = Some(true); // the destination acknowledged its checksums
        return Ok(());
    }
    // Local: a destination in this process, over loopback TCP.
    let side = if opts.postcopy.is_some() || opts.lazy_destination {
        Side::LazyDestination
    } else {
        Side::LocalDestination
    };
    let dest = guest_ram(
        opts.size,
        &opts.backing,
        opts.clear_shift,
        side,
        DESTINATION_LOG,
    )?;
    let start_guest = postcopy_guest(dest, opts)?;
    // Pre-copy with a vCPU: the destination VM is made now, so the
    // switch-over only loads the shipped `cpu` section into it.
    let precopy_guest = match (&start_guest, kvm_present(opts)) {
        (None, true) if opts.workload == options::Workload::Increment => {
            Some(kvm::prepare_destination(dest)?)
        }
        _ => None,
    };
    let listener = Arc::new(listen("127.0.0.1:0", opts)?);
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let resume = (opts.resume || opts.break_postcopy.is_some()).then(|| listener.clone());
    let refuse_section = opts.refuse_section.clone();
    // As many as the source announces.
    let channels = Some(Channels {
        listener: listener.clone(),
        expect: None,
    });
    let receiver = std::thread::spawn(move || {
        // Bounded, so a source that never connects cannot leave this
        // thread waiting for ever.
        let conn = listener
            .accept_migration(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let how = Incoming {
            fresh: true,
            postcopy: start_guest,
            resume,
            precopy: precopy_guest,
            refuse_section,
            channels,
        };
        destination::receive(dest, conn, how)
    });
    let to = connector(&addr.to_string(), opts)?;
    let conn = to.connect().map_err(|e| e.to_string())?;
    let result = send(ram, guest, conn, &to);
    summary.guest_progress = guest.progress() - start_progress;
    let result = result.and_then(|sent| guest_alive(guest).map(|()| sent));
    let received = receiver
        .join()
        .map_err(|_| "the destination thread panicked".to_string())?;
    let sent = result.map_err(|e| {
        let e = match &received {
            Err(d) => format!("{e} ({d})"),
            Ok(_) => e,
        };
        still_running(e, guest, opts)
    })?;
    summary.stats = sent.stats;
    summary.pass0_bandwidth = sent.pass0_bandwidth;
    summary.passes = sent.passes;
    summary.zero_copy = sent.zero_copy;
    let mut received = received?;
    summary.fault_latency = received.latency;
    summary.resumes = received.resumes;
    let precopy_guest = match received.guest.take() {
        Some(g) if !received.summary.postcopy => Some(g),
        g => {
            received.guest = g;
            None
        }
    };
    if let Some(mut dest_guest) = precopy_guest {
        // Pre-copy: the destination's vCPU runs from the `cpu` section,
        // started before it confirmed the handover. Downtime as QEMU
        // counts it: the source's pause to that confirmation (the
        // engine's), the RAM-only part beside it.
        summary.ram_downtime_ns = Some(summary.stats.ram_downtime_ns);
        let ran = destination_continues(dest_guest.as_mut());
        dest_guest.stop();
        summary.destination_progress = Some(dest_guest.progress());
        summary.mismatch = verify_resumed(ram, dest, &sent.device_state)?;
        let ran = ran.is_ok() && summary.mismatch.is_none();
        summary.destination_ran = Some(ran);
        summary.verified = Some(ran);
        return Ok(());
    }
    summary.mismatch = match received.guest {
        // Post-copy: the destination guest ran on from the source's state.
        Some(mut dest_guest) => {
            dest_guest.stop();
            summary.destination_progress = Some(dest_guest.progress());
            verify_resumed(ram, dest, &sent.device_state)?
        }
        // The source guest is paused at its switch-over state: compare.
        None => first_mismatch(ram, dest),
    };
    summary.verified = Some(summary.mismatch.is_none());
    Ok(())
}

/// Whether KVM runs the guest here (else a host thread writes its RAM).
fn kvm_present(opts: &MigrateOptions) -> bool {
    !opts.no_kvm && std::path::Path::new("/dev/kvm").exists()
}

/// Waits (at most 10 s) until a destination guest started from the
/// source's vCPU completes a loop of its workload, or fails.
fn destination_continues(guest: &mut dyn Guest) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while guest.progress() < 1 && Instant::now() < deadline {
        if let Some(e) = guest.failure() {
            return Err(format!("the destination guest stopped: {e}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    match guest.failure() {
        Some(e) => Err(format!("the destination guest stopped: {e}")),
        None if guest.progress() >= 1 => Ok(()),
        None => Err("the destination guest made no progress in 10 s".into()),
    }
}

/// Checks a destination whose guest ran on after post-copy: with the
/// increment workload's registers in `state`, every page must equal the
/// source's but for the counter bytes the destination guest incremented
/// since; without a vCPU state nothing ran there and the RAM must be equal.
fn verify_resumed(
    source: &GuestRam,
    dest: &GuestRam,
    state: &[u8],
) -> Result<Option<(String, u64)>, String> {
    if state.is_empty() {
        return Ok(first_mismatch(source, dest));
    }
    let (work, next) = kvm::resume_point(source, state)?;
    let (vs, vd) = (source.read(), dest.read());
    let (Some(a), Some(b)) = (vs.by_name(RAM_BLOCK), vd.by_name(RAM_BLOCK)) else {
        return Err("no guest RAM block".into());
    };
    Ok(
        ramblock_kvm::guest::check_resumed_increment(&a.region(), &b.region(), &work, next)
            .err()
            .map(|m| {
                eprintln!("post-copy verification: {m}");
                let page = match m {
                    ResumeMismatch::Byte { page, .. } | ResumeMismatch::Increment { page, .. } => {
                        page
                    }
                    _ => 0,
                };
                (RAM_BLOCK.to_string(), page)
            }),
    )
}

/// Runs the guest until it has written its memory once, so the migration
/// moves real data. First writes cost most on a nested host (about 3 s
/// per GiB here), so the wait allows 10 s plus 10 s per GiB before it
/// goes on regardless; a vCPU that died is an error. Returns the guest's
/// progress per second over [`RATE_WINDOW`] after that, the rate its
/// progress during the migration is compared with.
fn warm_up(guest: &mut dyn Guest, opts: &MigrateOptions) -> Result<f64, String> {
    if opts.workload == options::Workload::Increment {
        let gib = opts.size.div_ceil(1 << 30) as u32;
        let deadline = Instant::now() + Duration::from_secs(10) * (1 + gib);
        while guest.progress() < 1 && Instant::now() < deadline && guest.failure().is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let (before, started) = (guest.progress(), Instant::now());
    std::thread::sleep(RATE_WINDOW);
    let rate = (guest.progress() - before) as f64 / started.elapsed().as_secs_f64();
    guest_alive(guest).map(|()| rate)
}

/// How long the guest's progress rate is measured before a migration.
const RATE_WINDOW: Duration = Duration::from_millis(500);

/// An error if the source guest's vCPU stopped on its own: a migration of
/// a dead guest would "verify" memory nobody was writing.
fn guest_alive(guest: &dyn Guest) -> Result<(), String> {
    match guest.failure() {
        Some(e) => Err(format!("the source guest stopped: {e}")),
        None => Ok(()),
    }
}

/// Adds to a failure whether the source guest kept running after it.
fn still_running(error: String, guest: &mut dyn Guest, opts: &MigrateOptions) -> String {
    if error.contains(source::GUEST_KEPT) {
        // Post-copy had begun: the guest may have run on the destination,
        // and this side keeps it paused, never resumes it.
        return error;
    }
    if opts.workload == options::Workload::Idle {
        return format!("{error}; the source guest was resumed");
    }
    let before = guest.progress();
    let deadline = Instant::now() + Duration::from_secs(5);
    while guest.progress() == before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    if guest.progress() > before {
        format!("{error}; the source guest is still running")
    } else {
        format!("{error}; the source guest made no progress after the failure")
    }
}
