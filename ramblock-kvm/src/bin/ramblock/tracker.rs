//! The uffd-wp dirty log over the program's guest RAM (`--dirty-log uffd-wp`).

use crate::memory::{GuestRam, RAM_BLOCK};
use ramblock_linux::dirty_log::UffdWpLog;

/// A uffd-wp log tracking `pc.ram` from now on. The engine marks all of it
/// dirty before its first pass, so what was written before does not need
/// to be in the log.
pub fn uffd_wp_log(ram: &GuestRam) -> Result<UffdWpLog, String> {
    let mut log = UffdWpLog::new().map_err(|e| format!("--dirty-log uffd-wp: {e}"))?;
    let view = ram.read();
    let block = view.by_name(RAM_BLOCK).ok_or("no guest RAM block")?;
    log.track(block.offset(), block.memory())
        .map_err(|e| format!("--dirty-log uffd-wp: tracking {RAM_BLOCK}: {e}"))?;
    Ok(log)
}
