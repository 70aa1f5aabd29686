//! Builds a small VM's block list and prints its layout in the RAM address
//! space: add three blocks, remove one, add another into the freed gap, and
//! grow a resizable block.
//!
//! Run with `cargo run -p ramblock-core --example layout --features alloc`.

use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::bitmap::Owned;
use ramblock_core::block::{BlockBitmaps, BlockSpec, RamBlock};
use ramblock_core::buffer::BufferMemory;
use ramblock_core::list::RamList;
use ramblock_core::listener::RamListener;
use ramblock_core::name::BlockName;
use std::error::Error;

/// Host memory over a heap buffer: this example needs no OS support. Sizes
/// are kept small because the buffer is real memory.
type Memory = BufferMemory<Box<[u8]>>;
type List<'l> = RamList<'l, Memory, Owned, 8>;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Prints every change, as a KVM memslot manager would act on it.
struct Logger;

impl RamListener<Memory, Owned> for Logger {
    fn block_added(&self, b: &RamBlock<Memory, Owned>) {
        println!("  + {} at {}", b.name(), b.offset());
    }

    fn block_removed(&self, b: &RamBlock<Memory, Owned>) {
        println!("  - {} from {}", b.name(), b.offset());
    }

    fn block_resized(&self, b: &RamBlock<Memory, Owned>, old: ByteLen, new: ByteLen) {
        println!("  ~ {} resized {old} -> {new}", b.name());
    }
}

/// Adds a block of `used` bytes (resizable up to `max` when larger), backed
/// by a zeroed heap buffer of `max` bytes.
fn add(list: &List<'_>, name: BlockName, used: u64, max: u64) -> Result<(), Box<dyn Error>> {
    let mut spec = BlockSpec::new(name, ByteLen(used));
    if max > used {
        spec = spec.resizable(ByteLen(max));
    }
    let bitmaps = BlockBitmaps::for_spec(&spec)?;
    let buffer = vec![0u8; max as usize].into_boxed_slice();
    let memory = BufferMemory::new(buffer, ByteLen(used), PageSize::SIZE_4K)?;
    list.add(spec, memory, bitmaps).map_err(|r| r.error)?;
    Ok(())
}

fn print_layout(list: &List<'_>, title: &str) {
    println!("\n{title} (list version {})", list.version());
    println!(
        "{:<24} {:>10} {:>8} {:>8} {:>6}  flags",
        "name", "offset", "used", "max", "page"
    );
    for b in list.read().iter() {
        let flags: Vec<&str> = b.flags().iter_names().map(|(name, _)| name).collect();
        println!(
            "{:<24} {:>10} {:>8} {:>8} {:>6}  {}",
            b.name(),
            b.offset().to_string(),
            b.used_length().to_string(),
            b.max_length().to_string(),
            b.page_size().to_string(),
            flags.join("|"),
        );
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let logger = Logger;
    let list = List::new();
    list.add_listener(&logger)?;

    println!("adding blocks:");
    add(&list, BlockName::new("pc.ram")?, 16 * MIB, 16 * MIB)?;
    add(&list, BlockName::new("pc.bios")?, 256 * KIB, 256 * KIB)?;
    let vram = BlockName::with_prefix("0000:00:02.0", "vga.vram")?;
    add(&list, vram.clone(), 4 * MIB, 8 * MIB)?;
    print_layout(&list, "three blocks");

    println!("\nreplacing pc.bios by a smaller pc.rom:");
    list.remove("pc.bios")?;
    // Best fit: the 256 KiB hole pc.bios left is the smallest gap that holds
    // 128 KiB, so pc.rom lands there rather than after vga.vram.
    add(&list, BlockName::new("pc.rom")?, 128 * KIB, 128 * KIB)?;
    println!("\ngrowing {vram} to its maximum:");
    list.resize(vram.as_str(), ByteLen(8 * MIB))?;
    print_layout(&list, "after remove, add and resize");
    Ok(())
}
