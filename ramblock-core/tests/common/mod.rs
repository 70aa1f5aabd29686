//! What the core's integration tests share: blocks over plain buffers.

use ramblock_core::addr::{PageSize, RamAddr};
use ramblock_core::bitmap::Owned;
use ramblock_core::block::{BlockBitmaps, BlockSpec};
use ramblock_core::buffer::BufferMemory;
use ramblock_core::list::RamList;

/// Host memory for test blocks: a boxed buffer.
pub type Mem = BufferMemory<Box<[u8]>>;

/// Adds a block described by `spec` to `list`, over a buffer of
/// `spec.max_length` bytes filled with `fill` (4 KiB pages), and returns its
/// RAM address.
pub fn add_buffer_block<const N: usize>(
    list: &RamList<'_, Mem, Owned, N>,
    spec: BlockSpec,
    fill: u8,
) -> RamAddr {
    add_buffer_block_with_page_size(list, spec, fill, PageSize::SIZE_4K)
}

/// Like [`add_buffer_block`], with host pages of `page_size` (say, a 2 MiB
/// "hugepage" block over a plain buffer).
pub fn add_buffer_block_with_page_size<const N: usize>(
    list: &RamList<'_, Mem, Owned, N>,
    spec: BlockSpec,
    fill: u8,
    page_size: PageSize,
) -> RamAddr {
    let mem = Mem::new(
        vec![fill; spec.max_length.0 as usize].into_boxed_slice(),
        spec.used_length,
        page_size,
    )
    .unwrap();
    let bitmaps = BlockBitmaps::for_spec(&spec).unwrap();
    list.add(spec, mem, bitmaps).unwrap()
}
