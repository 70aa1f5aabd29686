//! Differential target `snapshot_meta`: the core's snapshot metadata
//! parser ([`Meta::parse`]) against a naive reader written from
//! `docs/snapshot-format.md` alone.
//!
//! An input is a flag byte, a file length (8 bytes) and the metadata's
//! bytes. With the flag's low bit set the metadata's checksum is made
//! right first ([`seal`]), so the fuzzer gets past it to the checks behind
//! it. Both readers must accept or refuse alike, and on acceptance agree
//! on the header, every block (name, lengths, offsets, checksums, every
//! bitmap bit) and every section (header and bytes).

use crate::{holds, same, Mismatch};
use ramblock_core::checksum::Checksum;
use ramblock_core::snapshot::{seal, Kind, Meta};

/// What the naive reader sees in a valid file.
#[derive(Debug, PartialEq, Eq)]
pub struct ModelFile {
    /// kind, parent id, parent checksum
    pub kind: (u32, [u8; 16], u64),
    /// The file id.
    pub file_id: [u8; 16],
    /// Blocks: name, used, page size, bitmap offset, data offset, held, content, data checksum, bitmap bits.
    pub blocks: Vec<(String, [u64; 7], Vec<bool>)>,
    /// Sections: name, instance, version, bytes.
    pub sections: Vec<(String, u32, u32, Vec<u8>)>,
}

fn u32le(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64le(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn name_field(f: &[u8]) -> Option<String> {
    let n = f[0] as usize;
    if n == 0 || f[1 + n..].iter().any(|&x| x != 0) {
        return None;
    }
    let s = std::str::from_utf8(&f[1..1 + n]).ok()?;
    (!s.contains('\0')).then(|| s.to_owned())
}

fn checksum(bytes: &[u8]) -> u64 {
    let mut c = Checksum::new();
    c.update(bytes);
    c.finish()
}

fn up(v: u128, a: u128) -> u128 {
    v.div_ceil(a) * a
}

/// The naive reader: `None` for a file it refuses. Offsets are computed in
/// `u128`, so no overflow needs handling; anything past `u64` is refused.
pub fn model(meta: &[u8], file_len: u64) -> Option<ModelFile> {
    // Shorter than a header: refused (the fuzzer's first find was this
    // model slicing past a short input; the seed `short-header` keeps it).
    if meta.len() < 96 {
        return None;
    }
    if meta.get(..8)? != b"RBLKSNAP" || u32le(meta, 8)? != 1 {
        return None;
    }
    let kind = u32le(meta, 12)?;
    let file_id: [u8; 16] = meta[16..32].try_into().ok()?;
    let parent: [u8; 16] = meta[32..48].try_into().ok()?;
    let parent_sum = u64le(meta, 48)?;
    match kind {
        0 if parent == [0; 16] && parent_sum == 0 => {}
        1 if parent != [0; 16] => {}
        _ => return None,
    }
    let (nb, ns) = (u32le(meta, 56)? as usize, u32le(meta, 60)? as usize);
    let meta_len = u64le(meta, 64)?;
    let data_end = u64le(meta, 72)?;
    if nb > 256 || ns > 1024 || meta_len == 0 || meta_len % 4096 != 0 || meta_len > 256 << 20 {
        return None;
    }
    if meta[88..96].iter().any(|&x| x != 0) || (meta.len() as u64) < meta_len || file_len < meta_len
    {
        return None;
    }
    let m = &meta[..meta_len as usize];
    let mut zeroed = m.to_vec();
    zeroed[80..88].fill(0);
    if checksum(&zeroed) != u64le(m, 80)? {
        return None;
    }
    let mut at: u128 = 96 + nb as u128 * 312 + ns as u128 * 288;
    if at > meta_len as u128 {
        return None;
    }
    let mut blocks: Vec<(String, [u64; 7], Vec<bool>)> = Vec::new();
    for i in 0..nb {
        let e = &m[96 + i * 312..96 + (i + 1) * 312];
        let name = name_field(&e[..256])?;
        let f: Vec<u64> = (0..7).map(|k| u64le(e, 256 + 8 * k).unwrap()).collect();
        let (used, page) = (f[0], f[1]);
        if !page.is_power_of_two() || !(4096..=1 << 30).contains(&page) {
            return None;
        }
        if used == 0 || used % page != 0 || used > 1 << 40 || blocks.iter().any(|b| b.0 == name) {
            return None;
        }
        at = up(at, 8);
        if f[2] as u128 != at {
            return None;
        }
        let pages = used / 4096;
        let bm_len = pages.div_ceil(64) * 8;
        if at + bm_len as u128 > meta_len as u128 {
            return None;
        }
        let bits: Vec<bool> = (0..bm_len * 8)
            .map(|p| m[(at as usize) + (p / 8) as usize] & (1 << (p % 8)) != 0)
            .collect();
        if bits[pages as usize..].iter().any(|&b| b) {
            return None;
        }
        let held = bits.iter().filter(|&&b| b).count() as u64;
        if held != f[4] || (kind == 0 && held != pages) {
            return None;
        }
        at += bm_len as u128;
        blocks.push((name, f.try_into().unwrap(), bits[..pages as usize].to_vec()));
    }
    let mut sections: Vec<(String, u32, u32, Vec<u8>)> = Vec::new();
    for j in 0..ns {
        let e = &m[96 + nb * 312 + j * 288..96 + nb * 312 + (j + 1) * 288];
        let name = name_field(&e[..256])?;
        let (inst, ver, len) = (u32le(e, 256)?, u32le(e, 260)?, u64le(e, 264)?);
        if len > 64 << 20 || sections.iter().any(|s| s.0 == name && s.1 == inst) {
            return None;
        }
        at = up(at, 8);
        if u64le(e, 272)? as u128 != at || at + len as u128 > meta_len as u128 {
            return None;
        }
        let bytes = m[at as usize..(at + len as u128) as usize].to_vec();
        if checksum(&bytes) != u64le(e, 280)? {
            return None;
        }
        at += len as u128;
        sections.push((name, inst, ver, bytes));
    }
    if up(at, 4096) != meta_len as u128 {
        return None;
    }
    let mut d = meta_len as u128;
    for b in &blocks {
        let align = b.1[1].max(4096) as u128;
        d = up(d, align);
        if b.1[3] as u128 != d {
            return None;
        }
        d += up(b.1[0] as u128, align);
    }
    if d > u64::MAX as u128 || data_end as u128 != d || file_len < data_end {
        return None;
    }
    Some(ModelFile {
        kind: (kind, parent, parent_sum),
        file_id,
        blocks,
        sections,
    })
}

/// Splits an input into (metadata, file length), resealing if asked.
pub fn prepare(data: &[u8]) -> (Vec<u8>, u64) {
    let flag = data.first().copied().unwrap_or(0);
    let file_len = data
        .get(1..9)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
    let mut meta = data.get(9..).unwrap_or_default().to_vec();
    if flag & 1 == 1 && meta.len() >= 96 {
        let len = (u64le(&meta, 64).unwrap_or(0).min(meta.len() as u64)) as usize;
        if len >= 96 {
            seal(&mut meta[..len]);
        }
    }
    (meta, file_len)
}

/// Runs both readers over an input and compares them.
pub fn check(data: &[u8]) -> Result<(), Mismatch> {
    let (meta, file_len) = prepare(data);
    let real = Meta::parse(&meta, file_len);
    let model = model(&meta, file_len);
    let (real, model) = match (real, model) {
        (Err(_), None) => return Ok(()),
        (Ok(r), Some(m)) => (r, m),
        (r, m) => {
            return Err(Mismatch {
                step: None,
                what: format!("acceptance: real {:?}, model {}", r.err(), m.is_some()),
            })
        }
    };
    let h = real.header();
    let kind = match h.kind {
        Kind::Full => (0, [0; 16], 0),
        Kind::Diff(p) => (1, p.id, p.checksum),
    };
    same(None, "kind", kind, model.kind)?;
    same(None, "file id", h.file_id, model.file_id)?;
    same(
        None,
        "block count",
        h.block_count as usize,
        model.blocks.len(),
    )?;
    for (i, (name, f, bits)) in model.blocks.iter().enumerate() {
        let b = real.block(i as u32).expect("counted");
        same(Some(i), "block name", b.name.as_str(), name.as_str())?;
        let got = [
            b.used_length.0,
            b.page_size.bytes(),
            b.bitmap_offset,
            b.data_offset,
            b.held_pages,
            b.content_checksum,
            b.data_checksum,
        ];
        same(Some(i), "block fields", &got, f)?;
        for (p, &bit) in bits.iter().enumerate() {
            holds(
                Some(i),
                real.holds(i as u32, p as u64) == bit,
                format!("page {p} held"),
            )?;
        }
    }
    same(
        None,
        "section count",
        h.section_count as usize,
        model.sections.len(),
    )?;
    for (j, (name, inst, ver, bytes)) in model.sections.iter().enumerate() {
        let (e, got) = real.section(j as u32).expect("counted");
        same(
            Some(j),
            "section",
            (
                e.header.name.as_str(),
                e.header.instance_id,
                e.header.version,
                got,
            ),
            (name.as_str(), *inst, *ver, &bytes[..]),
        )?;
    }
    Ok(())
}

/// The fuzz entry point: panics on a mismatch.
pub fn fuzz(data: &[u8]) {
    if let Err(m) = check(data) {
        panic!("{m}\ninput: {} bytes", data.len());
    }
}

/// A valid input: a small full snapshot's metadata (two blocks, one with
/// a bitmap tail, one 2 MiB-page block, one section) with a file length
/// that covers its data. Seeds and tests start from it.
pub fn valid_input() -> Vec<u8> {
    use ramblock_core::addr::{ByteLen, PageSize};
    use ramblock_core::name::BlockName;
    use ramblock_core::section::{SectionHeader, SectionName};
    use ramblock_core::snapshot::layout::{DataCursor, MetaCursor};
    use ramblock_core::snapshot::{section_checksum, BlockEntry, Header, SectionEntry};
    let blocks = [
        ("ram", 67 * 4096u64, PageSize::SIZE_4K),
        ("huge", 2 << 20, PageSize::SIZE_2M),
    ];
    let state = b"vcpu registers";
    let mut mc = MetaCursor::new(2, 1);
    let bm: Vec<u64> = blocks
        .iter()
        .map(|b| mc.bitmap(ByteLen(b.1)).unwrap())
        .collect();
    let so = mc.section(state.len() as u64).unwrap();
    let meta_len = mc.meta_len().unwrap();
    let mut dc = DataCursor::new(meta_len);
    let data: Vec<u64> = blocks
        .iter()
        .map(|b| dc.data(ByteLen(b.1), b.2).unwrap())
        .collect();
    let mut meta = vec![0u8; meta_len as usize];
    let header = Header {
        kind: Kind::Full,
        file_id: [3; 16],
        block_count: 2,
        section_count: 1,
        meta_len,
        data_end: dc.end(),
        meta_checksum: 0,
    };
    let mut h = [0u8; 96];
    header.encode(&mut h);
    meta[..96].copy_from_slice(&h);
    for (i, b) in blocks.iter().enumerate() {
        let pages = b.1 / 4096;
        let e = BlockEntry {
            name: BlockName::new(b.0).unwrap(),
            used_length: ByteLen(b.1),
            page_size: b.2,
            bitmap_offset: bm[i],
            data_offset: data[i],
            held_pages: pages,
            content_checksum: 5,
            data_checksum: 6,
        };
        let mut out = [0u8; ramblock_core::snapshot::BLOCK_ENTRY_LEN];
        e.encode(&mut out);
        meta[96 + i * out.len()..96 + (i + 1) * out.len()].copy_from_slice(&out);
        for p in 0..pages {
            meta[(bm[i] + p / 8) as usize] |= 1 << (p % 8);
        }
    }
    let s = SectionEntry {
        header: SectionHeader {
            name: SectionName::new("cpu").unwrap(),
            instance_id: 0,
            version: 1,
            len: state.len() as u64,
        },
        offset: so,
        checksum: section_checksum(state),
    };
    let mut out = [0u8; ramblock_core::snapshot::SECTION_ENTRY_LEN];
    s.encode(&mut out);
    let at = 96 + 2 * ramblock_core::snapshot::BLOCK_ENTRY_LEN;
    meta[at..at + out.len()].copy_from_slice(&out);
    meta[so as usize..so as usize + state.len()].copy_from_slice(state);
    seal(&mut meta);
    let mut input = vec![1u8];
    input.extend_from_slice(&dc.end().to_le_bytes());
    input.extend_from_slice(&meta);
    input
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_valid_input_is_accepted_by_both_and_every_byte_flip_agrees() {
        let input = valid_input();
        let (meta, len) = prepare(&input);
        assert!(Meta::parse(&meta, len).is_ok());
        assert!(model(&meta, len).is_some());
        // Flip each byte of the header and tables (resealed) and a sample
        // of the rest: both readers must still agree.
        for at in (9..input.len())
            .step_by(if cfg!(miri) { 97 } else { 1 })
            .take(2000)
        {
            let mut bad = input.clone();
            bad[at] ^= 0x41;
            check(&bad).unwrap_or_else(|m| panic!("byte {at}: {m}"));
        }
    }
}
