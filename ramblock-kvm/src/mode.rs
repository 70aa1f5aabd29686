//! Which of KVM's three dirty-log mechanisms a VM uses, and how one is
//! chosen: from the host's capabilities, or as asked.

use crate::caps::Capabilities;
use crate::error::KvmError;
use std::fmt;
use std::str::FromStr;

/// Default dirty-ring size in entries (64 KiB of ring per vCPU), as QEMU
/// suggests for `dirty-ring-size`.
pub const DEFAULT_RING_ENTRIES: u32 = 4096;

/// One of KVM's dirty-log mechanisms.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum DirtyLogMode {
    /// `KVM_GET_DIRTY_LOG` fetches and clears the slot's bitmap and
    /// re-protects the pages in one call.
    Bitmap,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with initially-set bitmaps:
    /// fetching leaves pages writable; `KVM_CLEAR_DIRTY_LOG` re-protects a
    /// range just before its pages are sent.
    ManualProtect,
    /// `KVM_CAP_DIRTY_LOG_RING`: each vCPU pushes dirtied pages into a ring
    /// of `entries` (a power of two) that userspace drains.
    Ring {
        /// Entries per vCPU ring.
        entries: u32,
    },
}

impl DirtyLogMode {
    /// Whether this mode reads the per-slot bitmap (bitmap or manual).
    pub fn uses_bitmap(self) -> bool {
        !matches!(self, DirtyLogMode::Ring { .. })
    }

    /// Whether `caps` offers this mode.
    pub fn offered_by(self, caps: &Capabilities) -> bool {
        match self {
            DirtyLogMode::Bitmap => true,
            DirtyLogMode::ManualProtect => caps.manual_protect(),
            DirtyLogMode::Ring { .. } => caps.dirty_ring(),
        }
    }

    /// The mode ramblock picks on a host with `caps`: manual protect when
    /// offered (it spreads re-protection over the migration instead of one
    /// stall per harvest), the plain bitmap otherwise. The dirty ring is only
    /// used when asked for: it needs a size chosen for the workload and
    /// stops vCPUs when full, so (as in QEMU) it is opt-in.
    pub fn auto(caps: &Capabilities) -> DirtyLogMode {
        if caps.manual_protect() {
            DirtyLogMode::ManualProtect
        } else {
            DirtyLogMode::Bitmap
        }
    }
}

impl fmt::Display for DirtyLogMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirtyLogMode::Bitmap => f.write_str("bitmap"),
            DirtyLogMode::ManualProtect => f.write_str("manual"),
            DirtyLogMode::Ring { entries } => write!(f, "ring:{entries}"),
        }
    }
}

/// What the user asked for: a mode, or whatever the host does best.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum DirtyLogRequest {
    /// [`DirtyLogMode::auto`].
    #[default]
    Auto,
    /// Exactly this mode; an error if the host lacks it.
    Mode(DirtyLogMode),
}

impl DirtyLogRequest {
    /// A request for every mode in `modes` at once: one mode is fine, an
    /// empty list is [`DirtyLogRequest::Auto`], and two different modes are
    /// an error saying why they cannot be combined.
    pub fn from_modes(modes: &[DirtyLogMode]) -> Result<DirtyLogRequest, KvmError> {
        let Some(&first) = modes.first() else {
            return Ok(DirtyLogRequest::Auto);
        };
        for &second in &modes[1..] {
            if second == first {
                continue;
            }
            let why = if first.uses_bitmap() != second.uses_bitmap() {
                "KVM's dirty ring and dirty bitmap are exclusive: once a VM has a dirty ring, \
                 KVM_GET_DIRTY_LOG is refused"
            } else {
                "manual protect is the bitmap mode with deferred re-protection, a VM uses one \
                 or the other"
            };
            return Err(KvmError::ExclusiveModes { first, second, why });
        }
        Ok(DirtyLogRequest::Mode(first))
    }

    /// The mode to use on a host with `caps`.
    pub fn resolve(self, caps: &Capabilities) -> Result<DirtyLogMode, KvmError> {
        match self {
            DirtyLogRequest::Auto => Ok(DirtyLogMode::auto(caps)),
            DirtyLogRequest::Mode(mode) if mode.offered_by(caps) => Ok(mode),
            DirtyLogRequest::Mode(mode) => Err(KvmError::ModeUnsupported {
                mode,
                caps: caps.to_string(),
            }),
        }
    }
}

impl FromStr for DirtyLogRequest {
    type Err = KvmError;

    /// Parses `auto`, `bitmap`, `manual`, `ring` or `ring:<entries>`, or
    /// several joined by `,` or `+` (rejected unless they agree).
    fn from_str(s: &str) -> Result<Self, KvmError> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("auto") {
            return Ok(DirtyLogRequest::Auto);
        }
        let mut modes = Vec::new();
        for word in s.split([',', '+']).map(str::trim) {
            let mode = match word.split_once(':') {
                None if word == "bitmap" => DirtyLogMode::Bitmap,
                None if word == "manual" || word == "manual-protect" => DirtyLogMode::ManualProtect,
                None if word == "ring" => DirtyLogMode::Ring {
                    entries: DEFAULT_RING_ENTRIES,
                },
                Some(("ring", n)) => DirtyLogMode::Ring {
                    entries: n
                        .parse()
                        .map_err(|_| KvmError::ModeSyntax(word.to_string()))?,
                },
                _ => return Err(KvmError::ModeSyntax(word.to_string())),
            };
            modes.push(mode);
        }
        DirtyLogRequest::from_modes(&modes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(manual: bool, ring: bool) -> Capabilities {
        Capabilities {
            manual_protect_flags: if manual { 3 } else { 0 },
            dirty_ring_max_bytes: if ring { 1 << 16 } else { 0 },
            dirty_ring_acq_rel_max_bytes: 0,
            user_memory2: false,
            readonly_mem: true,
            memslots: 32,
            guest_memfd: false,
            guest_memfd_flags: 0,
        }
    }

    #[test]
    fn parses_single_modes() {
        let p = |s: &str| s.parse::<DirtyLogRequest>().unwrap();
        assert_eq!(p("auto"), DirtyLogRequest::Auto);
        assert_eq!(p("bitmap"), DirtyLogRequest::Mode(DirtyLogMode::Bitmap));
        assert_eq!(
            p("manual"),
            DirtyLogRequest::Mode(DirtyLogMode::ManualProtect)
        );
        assert_eq!(
            p("ring:1024"),
            DirtyLogRequest::Mode(DirtyLogMode::Ring { entries: 1024 })
        );
        assert!(matches!(
            "ring:x".parse::<DirtyLogRequest>(),
            Err(KvmError::ModeSyntax(_))
        ));
        assert!(matches!(
            "dirty".parse::<DirtyLogRequest>(),
            Err(KvmError::ModeSyntax(_))
        ));
    }

    #[test]
    fn ring_and_bitmap_together_is_an_error_that_says_so() {
        for s in ["ring,bitmap", "bitmap+ring:512", "manual,ring"] {
            let err = s.parse::<DirtyLogRequest>().unwrap_err();
            assert!(matches!(err, KvmError::ExclusiveModes { .. }), "{s}");
            assert!(err.to_string().contains("exclusive"), "{err}");
        }
        assert!(matches!(
            "bitmap,manual".parse::<DirtyLogRequest>(),
            Err(KvmError::ExclusiveModes { .. })
        ));
        assert_eq!(
            "bitmap,bitmap".parse::<DirtyLogRequest>().unwrap(),
            DirtyLogRequest::Mode(DirtyLogMode::Bitmap)
        );
    }

    #[test]
    fn auto_follows_the_capabilities_and_requests_are_checked() {
        assert_eq!(
            DirtyLogMode::auto(&caps(true, true)),
            DirtyLogMode::ManualProtect
        );
        assert_eq!(DirtyLogMode::auto(&caps(false, true)), DirtyLogMode::Bitmap);
        let ring = DirtyLogRequest::Mode(DirtyLogMode::Ring { entries: 512 });
        assert!(matches!(
            ring.resolve(&caps(true, false)),
            Err(KvmError::ModeUnsupported { .. })
        ));
        assert_eq!(
            ring.resolve(&caps(false, true)).unwrap(),
            DirtyLogMode::Ring { entries: 512 }
        );
    }
}
