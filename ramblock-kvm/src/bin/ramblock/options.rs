//! Command-line options of `ramblock migrate` and their parsing.

use clap::Args;
use ramblock_kvm::mode::DirtyLogRequest;
use std::path::PathBuf;

/// Options of `ramblock migrate`.
#[derive(Args, Debug, Clone)]
pub struct MigrateOptions {
    /// Guest RAM size (bytes, or with K/M/G suffix).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub size: u64,
    /// Host memory behind guest RAM: anonymous, memfd, hugetlb, or a file
    /// path (a directory gets an unlinked temporary file).
    #[arg(long, default_value = "anonymous", value_parser = parse_backing)]
    pub backing: Backing,
    /// Dirty-log mode: auto (the best KVM mode the host offers), bitmap,
    /// manual, ring or ring:ENTRIES (a power of two per vCPU), or uffd-wp
    /// (userfaultfd asynchronous write-protect read back with PAGEMAP_SCAN;
    /// needs no KVM log, and with --no-kvm the host writer then writes
    /// behind the block API's back, so only the tracker sees its writes).
    #[arg(long, default_value = "auto", value_parser = parse_mode)]
    pub dirty_log: DirtyLog,
    /// Clear-map chunk: 2^shift pages per bit (6..=31).
    #[arg(long, default_value_t = 18)]
    pub clear_shift: u8,
    /// Longest acceptable guest pause, in milliseconds (0: never switch
    /// over early, run --max-passes passes).
    #[arg(long, default_value_t = 300)]
    pub downtime_ms: u64,
    /// Bandwidth cap in MiB/s (0 = none).
    #[arg(long, default_value_t = 0)]
    pub bandwidth_mib: u64,
    /// Switch over after this many passes at the latest.
    #[arg(long, default_value_t = 30)]
    pub max_passes: u32,
    /// Never throttle the vCPUs. By default they are throttled when the
    /// guest dirties memory faster than it is sent: a guest that outruns the
    /// link would otherwise keep the migration going until --max-passes.
    #[arg(long)]
    pub no_auto_converge: bool,
    /// What the guest does: idle, increment (a byte in every page from
    /// 1 MiB up, forever), or random:RATE (random page writes per second).
    #[arg(long, default_value = "increment", value_parser = parse_workload)]
    pub workload: Workload,
    /// Be the destination: listen on tcp:HOST:PORT or unix:PATH (a UNIX
    /// stream socket; --local needs one) and receive one migration.
    #[arg(long, value_parser = parse_endpoint, conflicts_with = "to")]
    pub incoming: Option<String>,
    /// Be the source: migrate to a destination listening on tcp:HOST:PORT
    /// or unix:PATH.
    #[arg(long, value_parser = parse_endpoint)]
    pub to: Option<String>,
    /// Switch to post-copy after N pre-copy passes (default 1; 0: at once)
    /// unless pre-copy converges first: the guest moves to the destination
    /// and its missing pages follow on demand. Give it to the destination
    /// too (`--incoming ... --postcopy`), so it does not preallocate RAM.
    #[arg(long, num_args = 0..=1, default_missing_value = "1", value_name = "N")]
    pub postcopy: Option<u32>,
    /// The destination does not preallocate its RAM: each received page is
    /// populated where it lands, and those first-touch faults count in the
    /// migration's time (as for QEMU's destination without -mem-prealloc).
    /// By default a pre-copy destination preallocates before it listens.
    #[arg(long)]
    pub lazy_destination: bool,
    /// Pre-copy pages travel on N page channels beside the main stream,
    /// each with a sending thread here and a receiving thread on the
    /// destination (0: pages on the main stream). Default: two per CPU of
    /// this host, at most 8 (ramblock_linux::channels::default_channel_count);
    /// 0 with --local, --postcopy 0, --zero-copy or over a UNIX socket
    /// (refused above 0 with --local and --zero-copy). The destination
    /// accepts as many as the source announces; given to --incoming, N is a
    /// check (a source announcing another count is refused).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub channels: Option<u32>,
    /// If the connection breaks during post-copy, reconnect and resume
    /// instead of failing (both sides keep their state meanwhile).
    #[arg(long)]
    pub resume: bool,
    /// Testing: the destination's VMM refuses the device-state section of
    /// this name (say `cpu`), so the source must resume its guest.
    #[arg(long, hide = true, value_name = "NAME")]
    pub refuse_section: Option<String>,
    /// Testing: break the connection at up to 3 random points during
    /// post-copy, from this seed (the source's side; implies --resume).
    #[arg(long, hide = true, value_name = "SEED")]
    pub break_postcopy: Option<u64>,
    /// Mutual TLS 1.3: this side's certificate chain (PEM, leaf first),
    /// presented to the peer. Give --tls-cert, --tls-key and --tls-ca on
    /// both sides; a TLS destination drops plaintext peers and peers
    /// without a certificate the CA signed.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// Mutual TLS: the private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: the CA certificate(s) the peer's certificate must be
    /// signed by (PEM). The source also checks that the destination's
    /// certificate names the host of --to.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// Destination: how long a connecting peer has to finish the TLS
    /// handshake and send a valid header before it is dropped (ms).
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    pub handshake_timeout_ms: u64,
    /// How long a silent peer is waited for: a read that gets no byte, or
    /// a write the peer takes no byte of, for this long breaks the
    /// connection. In pre-copy the migration fails and the source guest
    /// runs on; after the switch to post-copy the source reconnects with
    /// --resume, else it keeps its guest paused (ms).
    #[arg(long, default_value_t = 120_000, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub peer_timeout_ms: u64,
    /// Local live update (same host): guest RAM's fds travel over a UNIX
    /// socket (`SCM_RIGHTS`) and no page is copied; only the vCPU state
    /// moves. Needs memory another process can map: `--backing memfd`,
    /// `hugetlb` (then a hugetlb memfd) or a file. With `--to`/`--incoming`
    /// the address must be unix:PATH.
    #[arg(long)]
    pub local: bool,
    /// With --local: how the destination readies guest RAM before the
    /// switch-over: vcpu (a spare vCPU writes every page atomically on the
    /// guest's page tables, so KVM maps them all), populate (fault the
    /// pages into this process's page tables only), both, or none.
    #[arg(long, default_value = "both", value_parser = parse_prefault)]
    pub prefault: Prefault,
    /// Do not use /dev/kvm even if present (a host thread writes instead).
    #[arg(long)]
    pub no_kvm: bool,
    /// Source over plain TCP: send guest pages with MSG_ZEROCOPY (the
    /// kernel pins them instead of copying; completions are tracked and
    /// waited for). Off by default: on loopback and veth the kernel copies
    /// anyway and it costs more than it saves (BENCHMARKS.md, "Zero-copy
    /// sends"); the summary says how many sends the kernel copied after
    /// all. Refused over TLS and UNIX sockets. Pages then travel on the
    /// main stream (no page channels by default; --channels N above 0 is
    /// refused: the page channels send by copy).
    #[arg(long, conflicts_with_all = ["incoming", "local"])]
    pub zero_copy: bool,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

impl MigrateOptions {
    /// Refuses post-copy into guest_memfd memory before anything starts:
    /// post-copy places pages with userfaultfd, which cannot register a
    /// guest_memfd mapping (Linux 6.18), so the destination would refuse
    /// only when the source had already switched over. Only where this
    /// side's memory is the destination's: one process, or `--incoming`
    /// (a source's own backing does not matter).
    pub fn postcopy_fits_backing(&self) -> Result<(), String> {
        let here_is_destination = self.to.is_none();
        if self.postcopy.is_some() && self.backing == Backing::GuestMemfd && here_is_destination {
            return Err(
                "--postcopy with --backing guest-memfd: userfaultfd cannot register \
                        guest_memfd memory, so missing pages could not be placed on demand; \
                        migrate it with pre-copy (without --postcopy)"
                    .into(),
            );
        }
        Ok(())
    }

    /// `--peer-timeout-ms` as a duration.
    pub fn peer_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.peer_timeout_ms)
    }

    /// The page channels a source opens: `--channels`, or the library's
    /// default for this host where channels apply (none with `--local`,
    /// whose pages never travel, with `--postcopy 0`, which sends no
    /// pre-copy page, with `--zero-copy`, which sends on the main stream,
    /// or to a UNIX socket, where the default stays one stream). An
    /// explicit count above 0 that cannot apply is refused.
    pub fn source_channels(&self) -> Result<u32, String> {
        let unix = self.to.as_deref().is_some_and(|a| a.starts_with("unix:"));
        match self.channels {
            Some(n) if n > 0 && self.zero_copy => Err(format!(
                "--channels {n} with --zero-copy: the page channels send by copy, zero-copy \
                 sends on the main stream only; leave out --channels (or give --channels 0)"
            )),
            Some(n) if n > 0 && self.local => Err(format!(
                "--channels {n} with --local: a local update moves no pages, so page channels \
                 have nothing to carry; leave out --channels"
            )),
            Some(n) => Ok(n),
            // Post-copy from the start sends no pre-copy page.
            None if self.local || self.zero_copy || unix || self.postcopy == Some(0) => Ok(0),
            None => Ok(ramblock_linux::channels::default_channel_count()),
        }
    }
}

/// Who tracks the guest's writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyLog {
    /// KVM's dirty log in this mode (without KVM: only the VMM's writes,
    /// marked through the block API).
    Kvm(DirtyLogRequest),
    /// userfaultfd asynchronous write-protect
    /// (`ramblock_linux::dirty_log::UffdWpLog`), with or without KVM.
    UffdWp,
}

impl DirtyLog {
    /// The mode the VM is built with: KVM's log goes unused with uffd-wp,
    /// so the cheapest, bitmap mode (logging is never switched on).
    pub fn kvm_request(self) -> DirtyLogRequest {
        match self {
            DirtyLog::Kvm(request) => request,
            DirtyLog::UffdWp => DirtyLogRequest::Mode(ramblock_kvm::mode::DirtyLogMode::Bitmap),
        }
    }
}

/// Where guest RAM lives on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory with transparent hugepages.
    Anonymous,
    /// A sealed memfd.
    Memfd,
    /// 2 MiB hugetlb pages.
    Hugetlb,
    /// A memfd of 2 MiB hugetlb pages (what `hugetlb` becomes with
    /// `--local`: anonymous hugetlb memory has no fd to pass).
    HugetlbMemfd,
    /// A file or a directory.
    File(PathBuf),
    /// A KVM guest_memfd (mmap and init-shared flags) of the guest's VM.
    GuestMemfd,
}

/// How a local update's destination readies guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefault {
    /// Nothing: every page faults on the guest's first touch.
    None,
    /// `MADV_POPULATE_WRITE` on this process's mapping.
    Populate,
    /// A spare vCPU touches every page on the guest's page tables.
    Vcpu,
    /// Both.
    Both,
}

impl Prefault {
    /// Whether this process's page tables are populated.
    pub fn populate(self) -> bool {
        matches!(self, Prefault::Populate | Prefault::Both)
    }
    /// Whether a spare vCPU builds KVM's mappings.
    pub fn vcpu(self) -> bool {
        matches!(self, Prefault::Vcpu | Prefault::Both)
    }
}

fn parse_prefault(s: &str) -> Result<Prefault, String> {
    Ok(match s {
        "none" => Prefault::None,
        "populate" => Prefault::Populate,
        "vcpu" => Prefault::Vcpu,
        "both" => Prefault::Both,
        _ => return Err(format!("{s:?}: use none, populate, vcpu or both")),
    })
}

/// The guest's activity during migration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Workload {
    /// Nothing writes.
    Idle,
    /// Increment a byte in every page from 1 MiB to the top of RAM (below
    /// the APIC hole at 0xFEC0_0000), in a loop.
    Increment,
    /// Random page writes at this many pages per second.
    Random(u64),
}

/// Parses `123`, `4K`, `512M`, `1G` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 10),
        Some('M') => (&s[..s.len() - 1], 20),
        Some('G') => (&s[..s.len() - 1], 30),
        Some('T') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 4096, 512M, 1G)"))?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_mode(s: &str) -> Result<DirtyLog, String> {
    if s == "uffd-wp" {
        return Ok(DirtyLog::UffdWp);
    }
    s.parse()
        .map(DirtyLog::Kvm)
        .map_err(|e: ramblock_kvm::KvmError| format!("{e} (or uffd-wp)"))
}

pub(crate) fn parse_backing(s: &str) -> Result<Backing, String> {
    Ok(match s {
        "anonymous" | "anon" => Backing::Anonymous,
        "memfd" => Backing::Memfd,
        "hugetlb" => Backing::Hugetlb,
        "hugetlb-memfd" => Backing::HugetlbMemfd,
        "guest-memfd" | "guest_memfd" => Backing::GuestMemfd,
        "" => {
            return Err(
                "empty backing: use anonymous, memfd, hugetlb, guest-memfd or a path".into(),
            )
        }
        path => Backing::File(PathBuf::from(path.strip_prefix("file:").unwrap_or(path))),
    })
}

fn parse_workload(s: &str) -> Result<Workload, String> {
    match s {
        "idle" => Ok(Workload::Idle),
        "increment" => Ok(Workload::Increment),
        _ => match s.strip_prefix("random:") {
            Some(rate) => rate
                .parse()
                .map(Workload::Random)
                .map_err(|_| format!("{rate:?} is not a rate in pages per second")),
            None => Err(format!(
                "unknown workload {s:?}: use idle, increment or random:RATE"
            )),
        },
    }
}

/// Checks `tcp:HOST:PORT` and returns `HOST:PORT`, or `unix:PATH`
/// (returned as it is).
fn parse_endpoint(s: &str) -> Result<String, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        return if path.is_empty() {
            Err(format!("{s:?}: a UNIX socket endpoint is unix:PATH"))
        } else {
            Ok(s.to_string())
        };
    }
    let addr = s
        .strip_prefix("tcp:")
        .ok_or_else(|| format!("{s:?}: endpoints look like tcp:HOST:PORT or unix:PATH"))?;
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(addr.to_string())
        }
        _ => Err(format!("{s:?}: endpoints look like tcp:HOST:PORT")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_workloads_and_endpoints_parse() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_workload("random:5000"), Ok(Workload::Random(5000)));
        assert!(parse_workload("random:x").is_err());
        assert_eq!(
            parse_endpoint("tcp:127.0.0.1:4444"),
            Ok("127.0.0.1:4444".into())
        );
        assert!(parse_endpoint("127.0.0.1:4444").is_err());
        assert_eq!(parse_endpoint("unix:/tmp/s"), Ok("unix:/tmp/s".into()));
        assert!(parse_endpoint("unix:").is_err());
        assert_eq!(parse_prefault("vcpu"), Ok(Prefault::Vcpu));
        assert!(parse_prefault("all").is_err());
        assert!(parse_endpoint("tcp:host:99999").is_err());
        assert_eq!(parse_backing("/tmp/x"), Ok(Backing::File("/tmp/x".into())));
        assert_eq!(parse_mode("uffd-wp"), Ok(DirtyLog::UffdWp));
        assert_eq!(
            parse_mode("bitmap"),
            Ok(DirtyLog::Kvm(DirtyLogRequest::Mode(
                ramblock_kvm::mode::DirtyLogMode::Bitmap
            )))
        );
        assert!(parse_mode("uffd").unwrap_err().contains("uffd-wp"));
        assert_eq!(parse_backing("guest-memfd"), Ok(Backing::GuestMemfd));
    }

    fn opts(args: &[&str]) -> Result<MigrateOptions, clap::Error> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            migrate: MigrateOptions,
        }
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("migrate").chain(args.iter().copied()))
            .map(|c| c.migrate)
    }

    fn channels(args: &[&str]) -> Result<u32, String> {
        opts(args).unwrap().source_channels()
    }

    #[test]
    fn the_source_opens_the_default_channels_where_they_apply() {
        let default = ramblock_linux::channels::default_channel_count();
        assert_eq!(channels(&[]), Ok(default));
        assert_eq!(channels(&["--to", "tcp:10.0.0.2:4444"]), Ok(default));
        assert_eq!(channels(&["--channels", "0"]), Ok(0));
        assert_eq!(channels(&["--channels", "3"]), Ok(3));
        // Where channels do not apply the default is one stream...
        assert_eq!(channels(&["--zero-copy", "--to", "tcp:h:1"]), Ok(0));
        assert_eq!(channels(&["--local"]), Ok(0));
        assert_eq!(channels(&["--postcopy", "0"]), Ok(0));
        assert_eq!(channels(&["--postcopy"]), Ok(default));
        assert_eq!(channels(&["--to", "unix:/tmp/s"]), Ok(0));
        assert_eq!(channels(&["--to", "unix:/tmp/s", "--channels", "2"]), Ok(2));
        assert_eq!(channels(&["--zero-copy", "--channels", "0"]), Ok(0));
        // ... and asking for them there is refused.
        let e = channels(&["--zero-copy", "--channels", "2"]).unwrap_err();
        assert!(e.contains("--zero-copy"), "{e}");
        let e = channels(&["--local", "--channels", "2"]).unwrap_err();
        assert!(e.contains("--local"), "{e}");
        let tls = ["--tls-cert", "c", "--tls-key", "k", "--tls-ca", "a"];
        assert_eq!(channels(&tls), Ok(default));
        assert!(opts(&["--channels", "65"]).is_err());
        assert!(opts(&["--zero-copy", "--incoming", "tcp:h:1"]).is_err());
    }
}
