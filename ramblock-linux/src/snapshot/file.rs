//! [`SnapshotFile`]: an open snapshot whose metadata passed every check.

use super::error::SnapshotError;
use super::io::read_region_at;
use ramblock_core::checksum::{finish_sum, page_digest};
use ramblock_core::region::HostRegion;
use ramblock_core::snapshot::{
    BlockEntry, FormatError, Header, Kind, Meta, SectionEntry, HEADER_LEN, MAX_META_LEN,
};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const PAGE: u64 = 4096;

/// An open snapshot file. Opening reads and checks the header, then reads
/// exactly the metadata the header claims (at most
/// [`MAX_META_LEN`](ramblock_core::snapshot::MAX_META_LEN) bytes, and no more
/// than the file holds) and checks every field of it with
/// [`Meta::parse`]; page data is read on demand.
#[derive(Debug)]
pub struct SnapshotFile {
    file: File,
    path: PathBuf,
    header: Header,
    meta: Box<[u8]>,
    blocks: Vec<BlockEntry>,
    sections: Vec<SectionEntry>,
}

impl SnapshotFile {
    /// Opens and checks the snapshot at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<SnapshotFile, SnapshotError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| {
            SnapshotError::io("open", path, e, "the snapshot must exist and be readable")
        })?;
        Self::from_file(file, path)
    }

    /// Checks the snapshot open as `file` (`path` names it in errors).
    pub fn from_file(file: File, path: impl Into<PathBuf>) -> Result<SnapshotFile, SnapshotError> {
        let path = path.into();
        let format = |error| SnapshotError::Format {
            path: path.clone(),
            error,
        };
        let len = file
            .metadata()
            .map_err(|e| SnapshotError::io("fstat", &path, e, "the snapshot must be a file"))?
            .len();
        let mut head = [0u8; HEADER_LEN];
        let got = (len as usize).min(HEADER_LEN);
        file.read_exact_at(&mut head[..got], 0)
            .map_err(|e| SnapshotError::io("pread", &path, e, "the snapshot must be readable"))?;
        let header = Header::decode(&head[..got]).map_err(format)?;
        // Bounded before allocating: by the format's limit (decode) and
        // by the file's length.
        debug_assert!(header.meta_len <= MAX_META_LEN);
        if header.meta_len > len {
            return Err(format(FormatError::FileTooShort {
                len,
                need: header.meta_len,
            }));
        }
        let mut meta = vec![0u8; header.meta_len as usize].into_boxed_slice();
        file.read_exact_at(&mut meta, 0)
            .map_err(|e| SnapshotError::io("pread", &path, e, "the snapshot must be readable"))?;
        let view = Meta::parse(&meta, len).map_err(format)?;
        let blocks = (0..view.block_count())
            .filter_map(|i| view.block(i))
            .collect();
        let sections = (0..view.section_count())
            .filter_map(|i| view.section(i).map(|(e, _)| e))
            .collect();
        Ok(SnapshotFile {
            file,
            path,
            header,
            meta,
            blocks,
            sections,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Whether this is a diff snapshot.
    pub fn is_diff(&self) -> bool {
        matches!(self.header.kind, Kind::Diff(_))
    }

    /// The block table.
    pub fn blocks(&self) -> &[BlockEntry] {
        &self.blocks
    }

    /// The index of the block called `name`.
    pub fn find_block(&self, name: &str) -> Option<usize> {
        self.blocks.iter().position(|b| b.name.as_str() == name)
    }

    /// Block `index`'s page bitmap (bit `i % 8` of byte `i / 8` is page `i`).
    pub fn bitmap(&self, index: usize) -> &[u8] {
        let b = &self.blocks[index];
        let start = b.bitmap_offset as usize;
        let len = ramblock_core::snapshot::layout::bitmap_len(b.used_length) as usize;
        &self.meta[start..start + len]
    }

    /// Whether the file holds page `page` of block `index`.
    pub fn holds(&self, index: usize, page: u64) -> bool {
        self.blocks.get(index).is_some_and(|_| {
            self.bitmap(index)
                .get((page / 8) as usize)
                .is_some_and(|b| b & (1 << (page % 8)) != 0)
        })
    }

    /// The section table.
    pub fn sections(&self) -> &[SectionEntry] {
        &self.sections
    }

    /// The bytes of the section called `name` with `instance_id`.
    pub fn section(&self, name: &str, instance_id: u32) -> Option<&[u8]> {
        self.sections
            .iter()
            .find(|s| s.header.name.as_str() == name && s.header.instance_id == instance_id)
            .map(|s| &self.meta[s.offset as usize..(s.offset + s.header.len) as usize])
    }

    /// Reads `region.len()` bytes of block `index` from page `first` into
    /// `region` (whole pages inside the block; holes read as zeros).
    pub fn read_pages(
        &self,
        index: usize,
        first: u64,
        region: &HostRegion<'_>,
    ) -> Result<(), SnapshotError> {
        let b = &self.blocks[index];
        let len = region.len() as u64;
        let end = first.checked_mul(PAGE).and_then(|s| s.checked_add(len));
        if len % PAGE != 0 || end.is_none_or(|e| e > b.used_length.0) {
            return Err(SnapshotError::Region(
                ramblock_core::region::RegionError::OutOfRange {
                    offset: ramblock_core::addr::ByteLen(first.saturating_mul(PAGE)),
                    len: ramblock_core::addr::ByteLen(len),
                    region_len: b.used_length,
                },
            ));
        }
        read_region_at(&self.file, region, b.data_offset + first * PAGE).map_err(|e| {
            SnapshotError::io("preadv", &self.path, e, "the snapshot must be readable")
        })
    }

    /// Reads every page the file holds and checks each block's data
    /// checksum; a mismatch is [`SnapshotError::DataChecksum`].
    pub fn verify_data(&self) -> Result<(), SnapshotError> {
        let mut buf = vec![0u8; 1 << 20];
        for (index, b) in self.blocks.iter().enumerate() {
            let mut sum = 0u64;
            let pages = b.pages();
            let mut page = 0;
            while page < pages {
                let n = (pages - page).min(buf.len() as u64 / PAGE);
                let chunk = &mut buf[..(n * PAGE) as usize];
                self.file
                    .read_exact_at(chunk, b.data_offset + page * PAGE)
                    .map_err(|e| {
                        SnapshotError::io("pread", &self.path, e, "the snapshot must be readable")
                    })?;
                for (i, p) in chunk.chunks_exact(PAGE as usize).enumerate() {
                    let at = page + i as u64;
                    if self.holds(index, at) {
                        sum = sum.wrapping_add(page_digest(at, p));
                    }
                }
                page += n;
            }
            let computed = finish_sum(sum, b.held_pages * PAGE);
            if computed != b.data_checksum {
                return Err(SnapshotError::DataChecksum {
                    path: self.path.clone(),
                    block: b.name.to_string(),
                    found: b.data_checksum,
                    computed,
                });
            }
        }
        Ok(())
    }
}
