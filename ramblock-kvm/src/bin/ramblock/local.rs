//! `--local`: a local live update. Guest RAM's fds travel over a UNIX
//! socket with the block table (`ramblock_linux::local_update`); no page
//! is copied. The destination maps the same memory, registers the same
//! memslot in a VM of its own (a VM cannot change processes: KVM answers
//! `EIO` to every ioctl from another process's address space), builds
//! KVM's mappings of guest RAM before the switch-over (`--prefault`), and
//! then only the vCPU's `cpu` section moves.
//!
//! Order: table and fds -> destination maps, registers, prefaults ->
//! "ready" -> source pauses its guest and sends the `cpu` section ->
//! destination starts its vCPU -> "running" (or a refusal, after which the
//! source guest resumes where it was).

use crate::memory::{GuestRam, RAM_BLOCK};
use crate::options::MigrateOptions;
use crate::source::CPU_SECTION;
use crate::workload::Guest;
use ramblock_core::addr::ByteLen;
use ramblock_core::bitmap::Owned;
use ramblock_core::block::{BlockBitmaps, BlockSpec};
use ramblock_core::list::RamList;
use ramblock_core::name::BlockName;
use ramblock_core::section::{SectionHeader, SectionName};
use ramblock_core::stream::format::DEFAULT_DEVICE_STATE_LIMIT;
use ramblock_kvm::guest::Workload as GuestWorkload;
use ramblock_linux::local_update::{
    describe_list, receive_reply, receive_state, receive_table, send_reply, send_state, send_table,
    Reply,
};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// How long either side waits for the other between two steps, on top of
/// the preparation's allowance.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the destination may take to map and prefault: first touches
/// cost about 3 s per GiB on a nested host.
fn prepare_timeout(size: u64) -> Duration {
    STEP_TIMEOUT + Duration::from_secs(10) * (size.div_ceil(1 << 30) as u32)
}

/// Fails fast when `ram` cannot be handed over (anonymous memory): before
/// the guest starts, with the library's error (which says what to use).
pub fn check_shareable(ram: &GuestRam) -> Result<(), String> {
    describe_list(&ram.read())
        .map(drop)
        .map_err(|e| e.to_string())
}

/// What the source of a local update measured.
pub struct LocalSent {
    /// Table sent to destination ready (mapping, memslots, prefault).
    pub prepare_ns: u64,
    /// When the source paused its guest.
    pub paused_at: Instant,
    /// When the destination's "running" arrived.
    pub running_ack: Instant,
    /// Bytes on the socket (table and device state).
    pub bytes: u64,
}

/// The source's side: sends the table and fds, waits until the
/// destination is ready, pauses the guest and sends its `cpu` section. On
/// any failure after the pause the guest resumes here.
pub fn send(
    ram: &GuestRam,
    guest: &mut dyn Guest,
    sock: &UnixStream,
    opts: &MigrateOptions,
) -> Result<LocalSent, String> {
    let t0 = Instant::now();
    let table_bytes = {
        let view = ram.read();
        let blocks = describe_list(&view).map_err(|e| e.to_string())?;
        send_table(sock, &blocks).map_err(|e| e.to_string())?
    };
    sock.set_read_timeout(Some(prepare_timeout(opts.size)))
        .map_err(|e| e.to_string())?;
    receive_reply(sock, &Reply::Ready).map_err(|e| format!("the destination is not ready: {e}"))?;
    let prepare_ns = t0.elapsed().as_nanos() as u64;
    sock.set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let paused_at = Instant::now();
    guest.pause();
    let state = guest.save_state();
    let switched = (|| {
        if state.is_empty() {
            return Err("the source guest has no vCPU state to hand over".to_string());
        }
        let header = SectionHeader {
            name: SectionName::new(CPU_SECTION).map_err(|e| e.to_string())?,
            instance_id: 0,
            version: 1,
            len: state.len() as u64,
        };
        send_state(sock, &[(header, &state)]).map_err(|e| e.to_string())?;
        receive_reply(sock, &Reply::Running).map_err(|e| e.to_string())
    })();
    if let Err(e) = switched {
        guest.resume();
        return Err(format!("{e}; the source guest was resumed"));
    }
    Ok(LocalSent {
        prepare_ns,
        paused_at,
        running_ack: Instant::now(),
        bytes: (table_bytes + state.len() + SectionHeader::ENCODED_LEN + 3 * 24) as u64,
    })
}

/// What the destination of a local update saw.
pub struct LocalReceived {
    /// Table received to ready.
    pub prepare_ns: u64,
    /// Of which the prefault.
    pub prefault_ns: u64,
    /// When the `cpu` section arrived (the switch-over, as seen here).
    pub state_at: Instant,
    /// When the vCPU was started from it.
    pub running_at: Instant,
    /// When the guest had completed two loops here, if it did.
    pub two_loops_at: Option<Instant>,
    /// Whether the guest continued the source's loop (progress and the
    /// memory's pattern both agree).
    pub ran: bool,
    /// Loops completed here.
    pub progress: u64,
    /// Why the check failed, if it did.
    pub failure: Option<String>,
}

/// The destination's side, over `sock`, until the guest has run two loops
/// here and been checked.
pub fn receive(sock: &UnixStream, opts: &MigrateOptions) -> Result<LocalReceived, String> {
    sock.set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let blocks = receive_table(sock).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let ram = map_blocks(blocks, opts.prefault.populate())?;
    let (mut start, prefault_ns) = crate::kvm::prepare_local(ram, opts.prefault.vcpu())?;
    send_reply(sock, &Reply::Ready).map_err(|e| e.to_string())?;
    let prepare_ns = t0.elapsed().as_nanos() as u64;
    // The source decides when to switch over: wait as long as it may run.
    sock.set_read_timeout(None).map_err(|e| e.to_string())?;
    let sections = receive_state(sock, DEFAULT_DEVICE_STATE_LIMIT).map_err(|e| e.to_string())?;
    let state_at = Instant::now();
    let refuse = |code: u32, why: String| {
        let _ = send_reply(sock, &Reply::Refused(code, why.clone()));
        why
    };
    let mut cpu = None;
    for (header, bytes) in sections {
        if header.name.as_str() != CPU_SECTION || header.instance_id != 0 || cpu.is_some() {
            return Err(refuse(
                2,
                format!(
                    "no device for section {:?} ({})",
                    header.name.as_str(),
                    header.instance_id
                ),
            ));
        }
        cpu = Some(bytes);
    }
    let cpu = cpu.ok_or_else(|| refuse(2, "no `cpu` section".into()))?;
    // Where the source stopped, read before anything runs here.
    let (work, next) = crate::kvm::resume_point(ram, &cpu).map_err(|e| refuse(3, e))?;
    let before = first_byte(ram, next).map_err(|e| refuse(3, e))?;
    let mut guest = start(&cpu).map_err(|e| refuse(3, e))?;
    let running_at = Instant::now();
    send_reply(sock, &Reply::Running).map_err(|e| e.to_string())?;
    let deadline = running_at + Duration::from_secs(10) * (1 + opts.size.div_ceil(1 << 30) as u32);
    while guest.progress() < 2 && Instant::now() < deadline && guest.failure().is_none() {
        std::thread::sleep(Duration::from_micros(200));
    }
    let two_loops_at = (guest.progress() >= 2).then(Instant::now);
    guest.pause();
    let progress = guest.progress();
    let after = guest.save_state();
    let failure = match guest.failure() {
        Some(e) => Some(format!("the destination guest stopped: {e}")),
        None if progress < 1 => Some("the destination guest made no progress".into()),
        None => check_continued(ram, &work, next, before, &after).err(),
    };
    guest.stop();
    Ok(LocalReceived {
        prepare_ns,
        prefault_ns,
        state_at,
        running_at,
        two_loops_at,
        ran: failure.is_none(),
        progress,
        failure,
    })
}

/// Maps the received blocks and lists them as the program's guest RAM.
fn map_blocks(
    blocks: Vec<ramblock_linux::local_update::ReceivedBlock>,
    populate: bool,
) -> Result<&'static GuestRam, String> {
    let list: &'static GuestRam = Box::leak(Box::new(RamList::<_, Owned, 8>::new()));
    for b in blocks {
        let (name, used, max, flags) = (
            b.block.name.clone(),
            b.block.used,
            b.block.max,
            b.block.flags,
        );
        let memory = b.map(populate).map_err(|e| e.to_string())?;
        let mut spec =
            BlockSpec::new(BlockName::new(&name).map_err(|e| e.to_string())?, used).flags(flags);
        if max != used {
            spec = spec.resizable(max);
        }
        let bitmaps = BlockBitmaps::for_spec(&spec).map_err(|e| e.to_string())?;
        list.add(spec, memory, bitmaps)
            .map_err(|e| format!("cannot add {name}: {e}"))?;
    }
    if list.read().by_name(RAM_BLOCK).is_none() {
        return Err(format!("the source sent no {RAM_BLOCK} block"));
    }
    Ok(list)
}

/// The first byte of workload page `index`.
fn first_byte(ram: &GuestRam, index: u64) -> Result<u8, String> {
    let view = ram.read();
    let block = view.by_name(RAM_BLOCK).ok_or("no guest RAM block")?;
    let mut b = [0u8];
    block
        .region()
        .read(
            ByteLen(ramblock_kvm::guest::WORKLOAD_FIRST + (index << 12)),
            &mut b,
        )
        .map_err(|e| e.to_string())?;
    Ok(b[0])
}

/// Checks that the guest continued from page `next` (whose byte was
/// `before` at the switch-over) and stopped at the state `after`: every
/// page before its next page holds one more than every page from it on
/// (the increment loop over memory that started zero, the source's and
/// this side's increments together), and the pages the source had not yet
/// reached in its pass were incremented here, not skipped or doubled.
fn check_continued(
    ram: &GuestRam,
    work: &GuestWorkload,
    next: u64,
    before: u8,
    after: &[u8],
) -> Result<(), String> {
    let (_, stop) = crate::kvm::resume_point(ram, after)?;
    let pages = work.pages();
    let low = first_byte(ram, pages - 1)?;
    let high = if stop == 0 { low } else { first_byte(ram, 0)? };
    if stop > 0 && high != low.wrapping_add(1) {
        return Err(format!(
            "page 0 holds {high} and the last page {low}: not one loop apart"
        ));
    }
    let view = ram.read();
    let block = view.by_name(RAM_BLOCK).ok_or("no guest RAM block")?;
    let region = block.region();
    let mut b = [0u8];
    for i in 0..pages {
        region
            .read(
                ByteLen(ramblock_kvm::guest::WORKLOAD_FIRST + (i << 12)),
                &mut b,
            )
            .map_err(|e| e.to_string())?;
        let want = if i < stop { high } else { low };
        if b[0] != want {
            return Err(format!(
                "page {i} holds {} where the loop (stopped before page {stop}) leaves {want}",
                b[0]
            ));
        }
    }
    // Page `next` was incremented here at least once: its value moved on
    // from `before` by the loops this side ran.
    let now = if next < stop { high } else { low };
    if now == before {
        return Err(format!(
            "page {next}, where the source stopped, was never incremented here"
        ));
    }
    Ok(())
}
