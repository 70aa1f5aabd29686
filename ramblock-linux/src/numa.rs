//! NUMA: binding a block's memory to host nodes with `mbind(2)`.
//!
//! rustix does not wrap `mbind`, so it is called through `libc::syscall`.
//! A binding is applied before any page is faulted in (before
//! preallocation), since `mbind` only places pages allocated after it.
#![allow(unsafe_code)]

use crate::error::{Error, OptionsError};

/// Where pages may come from.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum NumaPolicy {
    /// `MPOL_BIND`: only from these nodes; fail rather than spill.
    #[default]
    Bind,
    /// `MPOL_PREFERRED`: from the first node if it has memory, else anywhere.
    Preferred,
    /// `MPOL_INTERLEAVE`: round-robin over the nodes.
    Interleave,
}

impl NumaPolicy {
    fn mode(self) -> libc::c_int {
        match self {
            NumaPolicy::Bind => 2,
            NumaPolicy::Preferred => 1,
            NumaPolicy::Interleave => 3,
        }
    }
}

/// A set of host nodes and a policy.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NumaBinding {
    /// Node numbers.
    pub nodes: Vec<u32>,
    /// The policy.
    pub policy: NumaPolicy,
}

/// `MPOL_MF_STRICT`: fail if existing pages are on other nodes.
const MPOL_MF_STRICT: libc::c_uint = 1;
/// `MPOL_MF_MOVE`: move existing pages that this process owns.
const MPOL_MF_MOVE: libc::c_uint = 2;

/// The host's online NUMA nodes (`[0]` where the kernel has no NUMA).
pub fn online_nodes() -> Vec<u32> {
    std::fs::read_to_string("/sys/devices/system/node/online")
        .map(|s| parse_node_list(s.trim()))
        .unwrap_or_else(|_| vec![0])
}

/// Parses a kernel node list such as `0-1,3`.
pub fn parse_node_list(list: &str) -> Vec<u32> {
    let mut nodes = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let mut ends = part.splitn(2, '-').map(|n| n.trim().parse::<u32>());
        match (ends.next(), ends.next()) {
            (Some(Ok(a)), None) => nodes.push(a),
            (Some(Ok(a)), Some(Ok(b))) if a <= b => nodes.extend(a..=b),
            _ => {}
        }
    }
    nodes
}

/// Checks a binding against the host before anything is mapped.
pub(crate) fn check(binding: &NumaBinding) -> Result<(), Error> {
    if binding.nodes.is_empty() {
        return Err(OptionsError::NoNumaNodes.into());
    }
    let online = online_nodes();
    if let Some(&node) = binding.nodes.iter().find(|n| !online.contains(n)) {
        return Err(Error::NoSuchNumaNode { node, online });
    }
    Ok(())
}

/// Binds `ptr .. ptr + len` to the binding's nodes.
///
/// # Safety
/// The range must be memory this crate owns.
pub(crate) unsafe fn bind(ptr: *mut u8, len: usize, binding: &NumaBinding) -> Result<(), Error> {
    check(binding)?;
    let bits = libc::c_ulong::BITS as usize;
    let highest = binding.nodes.iter().copied().max().unwrap_or(0) as usize;
    let mut mask = vec![0 as libc::c_ulong; highest / bits + 1];
    for &n in &binding.nodes {
        mask[n as usize / bits] |= 1 << (n as usize % bits);
    }
    // The kernel ignores the last bit of maxnode, so pass one more.
    let maxnode = (highest + 2) as libc::c_ulong;
    let flags = match binding.policy {
        NumaPolicy::Bind => MPOL_MF_STRICT | MPOL_MF_MOVE,
        _ => MPOL_MF_MOVE,
    };
    // SAFETY: mbind reads `mask` (sized for maxnode - 1 bits) and changes
    // only the policy of the caller's range.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            ptr,
            len,
            binding.policy.mode(),
            mask.as_ptr(),
            maxnode,
            flags,
        )
    };
    if rc != 0 {
        let errno = rustix::io::Errno::from_raw_os_error(
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        );
        return Err(Error::sys(
            "mbind",
            format!("binding {len:#x} bytes at {ptr:p} to nodes {:?} ({:?})", binding.nodes, binding.policy),
            errno,
            "the kernel needs CONFIG_NUMA and the nodes must have memory; ENOSYS means no NUMA support: drop the binding",
        ));
    }
    Ok(())
}
