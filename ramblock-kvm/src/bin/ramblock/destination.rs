//! The receiving side: one migration from a connection into guest RAM,
//! acknowledged on the same connection; in post-copy, with the guest
//! started here and its missing pages asked for (ramblock-linux's
//! `PostcopyDestination`), and (with resuming on) the source's new
//! connection accepted after a break, and no one else's (the library's
//! `transport::Listener` checks the resume token and the TLS identity).

use crate::link::{set_receive_buffer, POSTCOPY_SOCKET_BUFFER, RESUME_TIMEOUT};
use crate::memory::{ledger_for, GuestRam};
use crate::workload::Guest;
use ramblock_core::migrate::receiver::{
    acknowledge, ReceiveError, ReceiveSummary, Receiver, SectionSink, BOUNCE_BYTES,
};
use ramblock_core::migrate::PostcopyTarget;
use ramblock_core::section::SectionHeader;
use ramblock_core::stream::format::DEFAULT_DEVICE_STATE_LIMIT;
use ramblock_core::stream::io::IoStream;
use ramblock_linux::channels::{receive_page_channels, Gate};
use ramblock_linux::postcopy::{LatencySummary, PostcopyDestination};
use ramblock_linux::transport::{Conn, Listener, ResumeProof};
use std::sync::{Arc, Mutex};

/// Starts the guest from the source's device state.
pub type StartGuest = Box<dyn FnMut(&[u8]) -> Result<Box<dyn Guest>, String> + Send>;

/// The post-copy destination this program runs.
type Target = PostcopyDestination<&'static GuestRam, Conn, Box<dyn Guest>>;

/// The library's destination over `ram`, answering on `ret`; `start` runs
/// the guest once the source switches to post-copy, from the `cpu` section
/// the `Postcopy` record carried (`cpu`, filled by the section sink).
fn postcopy_target(
    ram: &'static GuestRam,
    ret: &Arc<Mutex<Conn>>,
    mut start: StartGuest,
    cpu: Arc<Mutex<Vec<u8>>>,
) -> Result<Target, String> {
    let conn = ret
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .try_clone()
        .map_err(|e| format!("cannot clone the connection: {e}"))?;
    let start = Box::new(move || {
        // Pages queue in the receive buffer too; a faulting vCPU waits
        // behind them.
        set_receive_buffer(conn.socket(), POSTCOPY_SOCKET_BUFFER);
        let state = std::mem::take(&mut *cpu.lock().unwrap_or_else(|e| e.into_inner()));
        start(&state).map_err(Into::into)
    });
    PostcopyDestination::new(ram, ret.clone(), start).map_err(|e| e.to_string())
}

/// The largest host page post-copy assembles (2 MiB hugetlb).
const HUGEPAGE_BUFFER: usize = 2 << 20;

/// How the destination receives.
pub struct Incoming {
    /// `ram` holds only zeros (new memory), so zero pages need no look.
    pub fresh: bool,
    /// Post-copy: how to start the guest here.
    pub postcopy: Option<StartGuest>,
    /// Where to accept a resumed connection after a post-copy break.
    pub resume: Option<Arc<Listener>>,
    /// Pre-copy: how to start the guest here from the shipped `cpu`
    /// section before confirming the handover (without it, or without a
    /// `cpu` section, the handover is confirmed at once: nothing to run).
    pub precopy: Option<StartGuest>,
    /// Testing: refuse the device-state section of this name.
    pub refuse_section: Option<String>,
    /// Pre-copy page channels: where to accept as many as the source's
    /// header announces (`None`: this destination takes none, and refuses
    /// a source that announces some).
    pub channels: Option<Channels>,
}

/// Where a destination accepts page channels.
pub struct Channels {
    /// The listener the main stream came in on.
    pub listener: Arc<Listener>,
    /// `--channels` given to `--incoming`: a source announcing another
    /// count is refused (`ChannelCountMismatch`) rather than received.
    pub expect: Option<u32>,
}

/// How long the destination waits for the page channels after the main
/// stream (the source opens them right after it).
const CHANNEL_ACCEPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The handover's refusal code when the guest could not be started here.
const CANNOT_START: u32 = 1;

/// What a completed receive did.
pub struct Received {
    /// The receiver's totals.
    pub summary: ReceiveSummary,
    /// Post-copy fault waits.
    pub latency: Option<LatencySummary>,
    /// The guest started here (running): by post-copy at its switch, or
    /// after a pre-copy from the `cpu` section, before the handover was
    /// confirmed.
    pub guest: Option<Box<dyn Guest>>,
    /// Connections resumed after a break.
    pub resumes: u32,
    /// Page channels the source announced (and, on success, this side
    /// received on).
    pub page_channels: u32,
}

/// This program's device-state sink: keeps every section (the one VMM
/// device it has is the vCPU, started from its `cpu` section after the
/// receive); refuses a name twice (code 1), one it has no device for
/// (code 2), or (testing) the one it was told to refuse (code 3).
#[derive(Default)]
struct Sections {
    done: Vec<(SectionHeader, Vec<u8>)>,
    partial: Vec<u8>,
    refuse: Option<String>,
    /// The `cpu` section's bytes too, for post-copy's start hook.
    cpu: Arc<Mutex<Vec<u8>>>,
}

impl SectionSink for Sections {
    fn load(&mut self, _: &SectionHeader, _: u64, bytes: &[u8]) -> Result<(), u32> {
        self.partial.extend_from_slice(bytes);
        Ok(())
    }
    fn done(&mut self, header: &SectionHeader) -> Result<(), u32> {
        let bytes = std::mem::take(&mut self.partial);
        if self.refuse.as_deref() == Some(header.name.as_str()) {
            return Err(3);
        }
        if header.name.as_str() != crate::source::CPU_SECTION || header.instance_id != 0 {
            return Err(2);
        }
        if self.done.iter().any(|(h, _)| h.name == header.name) {
            return Err(1);
        }
        bytes.clone_into(&mut self.cpu.lock().unwrap_or_else(|e| e.into_inner()));
        self.done.push((header.clone(), bytes));
        Ok(())
    }
}

/// Receives one stream into `ram` and answers the source. On error the
/// connection is shut down, so a source still sending notices at once.
pub fn receive(ram: &'static GuestRam, stream: Conn, how: Incoming) -> Result<Received, String> {
    let mut bounce = vec![0u8; BOUNCE_BYTES];
    let mut hugepage = vec![0u8; HUGEPAGE_BUFFER];
    // The end checksums come from what was received, page by page, so
    // verifying them adds nothing to the downtime (shared with the page
    // channels' threads).
    let ledger = ledger_for(ram);
    let cpu = Arc::new(Mutex::new(Vec::new()));
    let mut sections = Sections {
        refuse: how.refuse_section.clone(),
        cpu: cpu.clone(),
        ..Sections::default()
    };
    let _ = stream.set_nodelay();
    let ret = Arc::new(Mutex::new(
        stream
            .try_clone()
            .map_err(|e| format!("cannot clone the connection: {e}"))?,
    ));
    let mut target = match how.postcopy {
        Some(start) => Some(postcopy_target(ram, &ret, start, cpu)?),
        None => None,
    };
    // A resume must come from the source this migration came from.
    let identity = stream.peer_certificate().map(<[u8]>::to_vec);
    // What the source's header announced, which the listener read.
    let announced = stream.page_channels();
    let mut conn = stream;
    let mut resumes = 0;
    let mut receive_stream = |gate: Option<&Gate>| -> Result<_, String> {
        let mut shared = &ledger;
        let mut receiver = Receiver::new(&mut bounce)
            .map_err(|e| e.to_string())?
            .with_ledger(&mut shared)
            .with_device_state(&mut sections, DEFAULT_DEVICE_STATE_LIMIT)
            .with_hugepage_buffer(&mut hugepage);
        if how.fresh {
            receiver = receiver.with_fresh_destination();
        }
        if let Some(gate) = gate {
            receiver = receiver.with_channels(gate);
        }
        loop {
            let mut input = conn
                .reader()
                .map_err(|e| format!("cannot clone the connection: {e}"))?;
            let result = match target.as_mut() {
                Some(t) => receiver.receive_postcopy(ram, &mut input, t, |_| {}),
                None => receiver.receive(ram, &mut input, |_| {}),
            };
            // A resume the receiver refused for its token is one more
            // impostor (the listener checks the token first, so this is a
            // second line): wait on for the source.
            let broken = matches!(
                result,
                Err(ReceiveError::Truncated | ReceiveError::Io(_) | ReceiveError::BadResumeToken)
            );
            match (&how.resume, &mut target) {
                (Some(listener), Some(t)) if broken && receiver.in_postcopy() => {
                    conn.shutdown();
                    eprintln!("post-copy: the connection broke; waiting for the source to resume");
                    let proof = ResumeProof {
                        token: t.resume_token(),
                        identity: identity.clone(),
                    };
                    conn = listener
                        .accept_resume(&proof, RESUME_TIMEOUT)
                        .map_err(|e| format!("post-copy: no resumed connection: {e}"))?;
                    let _ = conn.set_nodelay();
                    set_receive_buffer(conn.socket(), POSTCOPY_SOCKET_BUFFER);
                    t.set_next_connection(
                        conn.try_clone()
                            .map_err(|e| format!("cannot clone the connection: {e}"))?,
                    );
                    resumes += 1;
                }
                _ => return Ok(result),
            }
        }
    };
    // Without a listener for channels this side takes none.
    let expect = how.channels.as_ref().map_or(Some(0), |c| c.expect);
    let result = match (&how.channels, expect) {
        // Another count than this side expects: the receiver refuses the
        // header (ChannelCountMismatch) against a gate of the expected
        // count, and the source hears why; no channel is accepted.
        (_, Some(expected)) if expected != announced => receive_stream(Some(&Gate::new(expected)))?,
        (Some(Channels { listener, .. }), _) if announced > 0 => {
            let channels = listener
                .accept_page_channels(announced, CHANNEL_ACCEPT_TIMEOUT)
                .map_err(|e| format!("cannot accept the page channels: {e}"))?;
            // A failed channel stops the main stream's reads too.
            let main = ret
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .try_clone()
                .map_err(|e| format!("cannot clone the connection: {e}"))?;
            let abort = move || main.shutdown();
            let (result, channels) =
                receive_page_channels(ram, Some(&ledger), how.fresh, channels, &abort, |gate| {
                    receive_stream(Some(gate))
                })
                .map_err(|e| format!("cannot start the page channels: {e}"))?;
            // The main stream's summary counts its own pages; the
            // channels' go with them.
            let (pages, zero_pages) = channels
                .channels
                .iter()
                .flatten()
                .fold((0, 0), |(p, z), c| (p + c.pages, z + c.zero_pages));
            let failed = channels.channels.into_iter().find_map(Result::err);
            match (result?, failed) {
                // The channel's own error says what went wrong.
                (Err(ReceiveError::ChannelFailed), Some(e)) => Err(e),
                (result, _) => result.map(|mut summary| {
                    summary.pages += pages;
                    summary.zero_pages += zero_pages;
                    summary
                }),
            }
        }
        _ => receive_stream(None)?,
    };
    let acked = {
        let mut ret = ret.lock().unwrap_or_else(|e| e.into_inner());
        acknowledge(&mut IoStream(&mut *ret), &result)
    };
    if result.is_err() {
        conn.shutdown();
    }
    let latency = target.as_ref().map(Target::latency);
    if let Some(Err(e)) = target.as_mut().map(Target::stop_faults) {
        eprintln!("post-copy: {e}");
    }
    let mut guest = target.and_then(Target::finish);
    let summary = result.map_err(|e| format!("destination refused the stream: {e}"))?;
    let handover = acked.map_err(|e| format!("cannot acknowledge: {e}"))?;
    if let Some(handover) = handover {
        // Pre-copy: the source keeps its guest paused until this side
        // says its own runs.
        let cpu = sections
            .done
            .iter()
            .find(|(h, _)| h.name.as_str() == crate::source::CPU_SECTION);
        let started = match (how.precopy, cpu) {
            (Some(mut start), Some((_, state))) => match start(state) {
                Ok(g) => Some(g),
                Err(e) => {
                    let mut ret = ret.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = handover.refuse(&mut IoStream(&mut *ret), CANNOT_START);
                    conn.shutdown();
                    return Err(format!("cannot start the guest here: {e}"));
                }
            },
            _ => None,
        };
        let confirmed = {
            let mut ret = ret.lock().unwrap_or_else(|e| e.into_inner());
            handover.confirm(&mut IoStream(&mut *ret))
        };
        if let Err(e) = confirmed {
            // The source may resume its guest: this copy must not run on.
            if let Some(mut g) = started {
                g.stop();
            }
            return Err(format!("cannot confirm that the guest runs here: {e}"));
        }
        guest = started.or(guest);
    }
    Ok(Received {
        summary,
        latency,
        guest,
        resumes,
        page_channels: announced,
    })
}
