//! Block checksums on every core: the chunk digests are computed in
//! parallel and combined in order, which gives exactly
//! `Checksum::of_region`'s value. Both sides compute them with the guest
//! paused, so this shortens the downtime.

use ramblock_core::checksum::{chunk_count, Checksum};
use ramblock_core::region::{HostRegion, OutOfRegion};

/// The checksum of the first `len` bytes of `region`.
pub fn parallel(region: &HostRegion, len: u64) -> Result<u64, OutOfRegion> {
    let chunks = usize::try_from(chunk_count(len)).unwrap_or(usize::MAX);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = chunks.div_ceil(cores.min(chunks).max(1)).max(1);
    let mut digests = vec![0u64; chunks];
    std::thread::scope(|s| {
        let workers: Vec<_> = digests
            .chunks_mut(per_thread)
            .enumerate()
            .map(|(t, out)| {
                s.spawn(move || {
                    for (k, digest) in out.iter_mut().enumerate() {
                        *digest = Checksum::chunk_digest(region, (t * per_thread + k) as u64, len)?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    })?;
    Ok(Checksum::combine(&digests, len))
}
