//! Fuzz target `channel_receive`: arbitrary bytes as one page channel
//! (`ramblock_core::migrate::channels::receive_channel`) into a destination
//! of two blocks, against a model of what a channel may carry:
//!
//! - Pages (tag 1) and Zero (tag 2) runs, checked in the main stream's
//!   order: block index against the published two-entry table (13), run
//!   length 1..=64 (14), overflow (15), the block's used length (16); a
//!   Pages payload cut short writes nothing (20);
//! - Barrier (tag 9) for exactly one channel (38 otherwise), generations
//!   0, 1, 2, ... (39 otherwise); the gate lets it through at once;
//! - every other known record read whole and refused (`OutOfPlace`, 23),
//!   an unknown tag 12, a record cut short 20;
//! - the stream ending between two records is a clean end.
//!
//! Memory must equal the model's byte for byte afterwards (guard bytes
//! everywhere the model did not write), with the same outcome.

use crate::model_cursor::Cursor;
use crate::stream_roundtrip;
use crate::{holds, same, Mismatch};
use ramblock_core::addr::ByteLen;
use ramblock_core::flags::BlockFlags;
use ramblock_core::migrate::channels::{receive_channel, ChannelGate, GateClosed};
use ramblock_core::migrate::receiver::ReceiveError;
use ramblock_core::name::BlockName;
use ramblock_core::stream::io::SliceReader;

const PAGE: usize = 4096;
/// The destination: (name, used pages).
const LAYOUT: [(&str, u64); 2] = [("pc.ram", 16), ("vga", 8)];

fn guard(block: usize, page: usize) -> u8 {
    stream_roundtrip::guard(block, page)
}

/// A gate for one channel whose meetings complete at once (the main
/// stream's side is not part of this target).
struct OneChannel(Vec<BlockName>);

impl ChannelGate for OneChannel {
    fn channels(&self) -> u32 {
        1
    }
    fn publish_table(&self, _: &[BlockName]) {}
    fn table(&self) -> Result<&[BlockName], GateClosed> {
        Ok(&self.0)
    }
    fn meet(&self, _: u32) -> Result<(), GateClosed> {
        Ok(())
    }
    fn close(&self) {}
}

/// The model: the outcome (pages and zero pages received, or the error
/// code) and the memory it leaves.
fn model(data: &[u8], memory: &mut [Vec<u8>]) -> Result<(u64, u64), u32> {
    let mut r = Cursor(data);
    let (mut pages, mut zero, mut generation) = (0u64, 0u64, 0u32);
    loop {
        let Ok(tag) = r.take(1) else {
            return Ok((pages, zero));
        };
        match tag[0] {
            1 | 2 => {
                let (block, first, count) = (r.u32()?, r.u64()?, r.u32()?);
                let used = LAYOUT.get(block as usize).ok_or(13u32)?.1;
                if count == 0 || count > 64 {
                    return Err(14);
                }
                let end = first.checked_add(u64::from(count)).ok_or(15u32)?;
                if end > used {
                    return Err(16);
                }
                let (at, len) = (first as usize * PAGE, count as usize * PAGE);
                let mem = &mut memory[block as usize][at..at + len];
                if tag[0] == 1 {
                    mem.copy_from_slice(r.take(len)?);
                    pages += u64::from(count);
                } else {
                    mem.fill(0);
                    zero += u64::from(count);
                }
            }
            9 => {
                let (g, channels) = (r.u32()?, r.u32()?);
                if channels != 1 {
                    return Err(38);
                }
                if g != generation {
                    return Err(39);
                }
                generation += 1;
            }
            3 | 4 => {
                r.u32()?;
                r.u64()?;
                return Err(23);
            }
            5 | 7 => {
                r.u32()?;
                return Err(23);
            }
            6 => {
                r.u32()?;
                r.u64()?;
                r.u32()?;
                return Err(23);
            }
            8 => return Err(23),
            _ => return Err(12),
        }
    }
}

/// Feeds `data` to the real channel receive and to the model; compares
/// the outcome and every byte of both blocks.
pub fn check(data: &[u8]) -> Result<(), Mismatch> {
    let harness = |e: String| Mismatch {
        step: None,
        what: format!("harness: {e}"),
    };
    let list = stream_roundtrip::List::new();
    let mut names = Vec::new();
    for (i, &(name, used)) in LAYOUT.iter().enumerate() {
        stream_roundtrip::add_block(&list, name, used, used, BlockFlags::MIGRATABLE, |p| {
            guard(i, p)
        })
        .map_err(|e| harness(e.to_string()))?;
        names.push(BlockName::new(name).map_err(|e| harness(e.to_string()))?);
    }
    let mut memory: Vec<Vec<u8>> = LAYOUT
        .iter()
        .enumerate()
        .map(|(i, &(_, used))| {
            (0..used as usize)
                .flat_map(|p| std::iter::repeat_n(guard(i, p), PAGE))
                .collect()
        })
        .collect();
    let want = model(data, &mut memory);
    let gate = OneChannel(names);
    let real = stream_roundtrip::with_buffers(|_, bounce| {
        receive_channel(
            &list,
            &mut SliceReader::new(data),
            &gate,
            None,
            false,
            bounce,
        )
    });
    let real_code = real
        .as_ref()
        .map(|s| (s.pages, s.zero_pages))
        .map_err(ReceiveError::code);
    same(None, "outcome (pages, or error code)", real_code, want).map_err(|mut m| {
        if let Err(e) = &real {
            m.what.push_str(&format!(" (real error: {e})"));
        }
        m
    })?;
    let view = list.read();
    for (block, model_mem) in view.iter().zip(&memory) {
        let mut real_mem = vec![0u8; model_mem.len()];
        block
            .read(ByteLen::ZERO, &mut real_mem)
            .map_err(|e| harness(e.to_string()))?;
        holds(
            None,
            &real_mem == model_mem,
            format_args!("{} memory differs from the model", block.name()),
        )?;
    }
    Ok(())
}

/// The fuzz entry point: panics on any mismatch.
pub fn fuzz(data: &[u8]) {
    if let Err(m) = check(data) {
        panic!("{m}\nreproducer: the {}-byte input itself", data.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ramblock_core::stream::format::Record;

    fn record(r: Record) -> Vec<u8> {
        let mut v = Vec::new();
        r.write(&mut v).unwrap();
        v
    }

    #[test]
    fn the_model_agrees_on_good_and_bad_channels() {
        let pages = |block, first, count: u32| {
            [
                record(Record::Pages {
                    block,
                    first,
                    count,
                }),
                vec![0x3C; count as usize * PAGE],
            ]
            .concat()
        };
        let barrier = |generation, channels| {
            record(Record::Barrier {
                generation,
                channels,
            })
        };
        let inputs: Vec<Vec<u8>> = vec![
            vec![],
            pages(0, 3, 2),
            [
                pages(1, 0, 8),
                barrier(0, 1),
                record(Record::Zero {
                    block: 0,
                    first: 0,
                    count: 16,
                }),
            ]
            .concat(),
            [barrier(0, 1), barrier(2, 1)].concat(),
            barrier(0, 2),
            pages(2, 0, 1),
            pages(0, 15, 2),
            pages(0, 0, 65),
            pages(0, 0, 2)[..100].to_vec(),
            record(Record::Sync {
                pass: 1,
                remaining: 0,
            }),
            record(Record::End { count: 2 })[..3].to_vec(),
            vec![200],
        ];
        for input in inputs {
            check(&input).unwrap();
        }
    }
}
