//! The local-update fd table (`ramblock_linux::local_update`): blocks sent
//! with their fds over a UNIX socket map the same pages in the receiver
//! (the kernel's view: a write on one side reads back on the other), the
//! device state and replies round trip, and every malformed message is its
//! own typed error.

mod common;

use common::{skip, HugepagePool};
use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::flags::BlockFlags;
use ramblock_core::host::HostMemory;
use ramblock_core::section::{SectionHeader, SectionName};
use ramblock_linux::local_update::{
    receive_reply, receive_state, receive_table, send_reply, send_state, send_table,
    LocalUpdateError, Reply, SharedBlock, FRAME_LEN, MAGIC, MAX_BLOCKS,
};
use ramblock_linux::{BackingKind, LinuxMemory, MemoryBuilder};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use std::io::{IoSlice, Write};
use std::mem::MaybeUninit;
use std::os::unix::net::UnixStream;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (a, b)
}

fn describe(name: &str, mem: &LinuxMemory) -> SharedBlock {
    SharedBlock::describe(name, 0, BlockFlags::SHARED | BlockFlags::MIGRATABLE, mem).unwrap()
}

/// Sends `memories` as a table, receives and maps them, and checks both
/// directions of sharing page by page on a few pages.
fn round_trip(memories: &[(&str, &LinuxMemory)]) -> Vec<LinuxMemory> {
    let (tx, rx) = pair();
    let table: Vec<_> = memories.iter().map(|(n, m)| (describe(n, m), *m)).collect();
    send_table(&tx, &table).unwrap();
    let received = receive_table(&rx).unwrap();
    assert_eq!(received.len(), memories.len());
    let mut mapped = Vec::new();
    for (r, (name, source)) in received.into_iter().zip(memories) {
        assert_eq!(r.block.name, *name);
        assert_eq!(r.block.kind, source.kind());
        assert_eq!(r.block.used, source.used_len());
        assert_eq!(r.block.page_size, source.page_size());
        let dest = r.map(true).unwrap();
        assert_eq!(dest.kind(), source.kind());
        assert_eq!(dest.used_len(), source.used_len());
        assert!(dest.is_shared());
        let (s, d) = (source.region(), dest.region());
        let last = source.used_len().0 - 4096;
        for (at, v) in [(0, 0x11u8), (4096, 0x22), (last, 0x33)] {
            s.write(ByteLen(at), &[v]).unwrap();
            let mut b = [0u8];
            d.read(ByteLen(at), &mut b).unwrap();
            assert_eq!(b[0], v, "the receiver sees the sender's write at {at:#x}");
            d.write(ByteLen(at + 1), &[v ^ 0xff]).unwrap();
            s.read(ByteLen(at + 1), &mut b).unwrap();
            assert_eq!(b[0], v ^ 0xff, "the sender sees the receiver's write");
        }
        mapped.push(dest);
    }
    mapped
}

#[test]
fn memfd_and_shared_file_blocks_map_the_same_pages() {
    let memfd = MemoryBuilder::memfd(ByteLen(4 * MIB))
        .max_length(ByteLen(8 * MIB))
        .name("pc.ram")
        .build()
        .unwrap();
    let dir = std::env::temp_dir();
    let file = MemoryBuilder::file(&dir, ByteLen(2 * MIB))
        .shared(true)
        .build()
        .unwrap();
    let mapped = round_trip(&[("pc.ram", &memfd), ("vga.vram", &file)]);
    assert_eq!(mapped[0].reserved_len(), ByteLen(8 * MIB));
    assert_eq!(mapped[1].kind(), BackingKind::File { hugetlbfs: false });
}

#[test]
fn hugetlb_memfd_blocks_map_the_same_pages() {
    let _pool = match HugepagePool::reserve(PageSize::SIZE_2M, 2) {
        Ok(p) => p,
        Err(reason) => return skip(&reason.to_string()),
    };
    let memfd = MemoryBuilder::memfd(ByteLen(4 * MIB))
        .huge_pages(PageSize::SIZE_2M)
        .build()
        .unwrap();
    let mapped = round_trip(&[("pc.ram", &memfd)]);
    assert_eq!(mapped[0].hugetlb_page_size(), Some(PageSize::SIZE_2M));
}

#[test]
fn memory_without_a_shareable_fd_is_refused_with_what_to_do() {
    let anon = MemoryBuilder::anonymous(ByteLen(2 * MIB)).build().unwrap();
    let e = SharedBlock::describe("pc.ram", 0, BlockFlags::MIGRATABLE, &anon).unwrap_err();
    assert!(matches!(
        e,
        LocalUpdateError::NotShareable {
            backing: "anonymous",
            ..
        }
    ));
    assert!(e.to_string().contains("--backing memfd"), "{e}");
    let private = MemoryBuilder::memfd(ByteLen(2 * MIB))
        .shared(false)
        .build()
        .unwrap();
    let e = SharedBlock::describe("pc.ram", 0, BlockFlags::MIGRATABLE, &private).unwrap_err();
    assert!(matches!(
        e,
        LocalUpdateError::NotShareable {
            backing: "privately mapped",
            ..
        }
    ));
}

#[test]
fn device_state_and_replies_round_trip() {
    let (tx, rx) = pair();
    let header = |name: &str, id| SectionHeader {
        name: SectionName::new(name).unwrap(),
        instance_id: id,
        version: 3,
        len: 0,
    };
    let cpu = vec![7u8; 5000];
    send_state(&tx, &[(header("cpu", 0), &cpu), (header("net", 2), &[])]).unwrap();
    let got = receive_state(&rx, 1 << 20).unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].0.name.as_str(), "cpu");
    assert_eq!(got[0].0.len, 5000);
    assert_eq!(got[0].1, cpu);
    assert_eq!(got[1].0.instance_id, 2);
    assert!(got[1].1.is_empty());
    // Over the limit: refused before the body is read.
    send_state(&tx, &[(header("cpu", 0), &cpu)]).unwrap();
    assert!(matches!(
        receive_state(&rx, 100),
        Err(LocalUpdateError::TooLong {
            what: "device state",
            ..
        })
    ));
    let (tx, rx) = pair();
    send_reply(&rx, &Reply::Ready).unwrap();
    receive_reply(&tx, &Reply::Ready).unwrap();
    send_reply(&rx, &Reply::Refused(2, "no device \"net\"".into())).unwrap();
    match receive_reply(&tx, &Reply::Running) {
        Err(LocalUpdateError::Refused { code: 2, reason }) => assert!(reason.contains("net")),
        other => panic!("{other:?}"),
    }
    send_reply(&rx, &Reply::Ready).unwrap();
    assert!(matches!(
        receive_reply(&tx, &Reply::Running),
        Err(LocalUpdateError::UnexpectedMessage { got: 3, .. })
    ));
}

/// A frame header as the wire format defines it.
fn frame(kind: u8, version: u16, count: u32, len: u64) -> Vec<u8> {
    let mut f = MAGIC.to_vec();
    f.extend_from_slice(&[kind, 0]);
    f.extend_from_slice(&version.to_le_bytes());
    f.extend_from_slice(&count.to_le_bytes());
    f.extend_from_slice(&len.to_le_bytes());
    assert_eq!(f.len(), FRAME_LEN);
    f
}

/// One valid table entry for a 2 MiB memfd block named `name`.
fn entry(name: &str, kind: u8, used: u64) -> Vec<u8> {
    let mut e = vec![name.len() as u8];
    e.extend_from_slice(name.as_bytes());
    e.extend_from_slice(&[kind, 12]);
    e.extend_from_slice(&(BlockFlags::SHARED.bits()).to_le_bytes());
    for v in [0u64, used, used, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e
}

/// Sends `bytes` with `fds` attached, then closes the sending side.
fn send_raw(bytes: &[u8], fds: &[&LinuxMemory]) -> Result<Vec<()>, LocalUpdateError> {
    let (tx, rx) = pair();
    let borrowed: Vec<_> = fds.iter().map(|m| m.fd().unwrap()).collect();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(80))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(&borrowed)));
    }
    rustix::net::sendmsg(
        &tx,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::empty(),
    )
    .unwrap();
    drop(tx);
    receive_table(&rx).map(|b| {
        b.into_iter()
            .map(|r| {
                r.map(false).map(drop).unwrap();
            })
            .collect()
    })
}

#[test]
fn malformed_tables_are_typed_errors() {
    let mem = MemoryBuilder::memfd(ByteLen(2 * MIB)).build().unwrap();
    let good = entry("pc.ram", 1, 2 * MIB);
    let table = |count: u32, body: &[u8]| {
        let mut t = frame(1, 1, count, body.len() as u64);
        t.extend_from_slice(body);
        t
    };
    // The well-formed message works, so each case below fails for its own reason.
    assert_eq!(send_raw(&table(1, &good), &[&mem]).unwrap().len(), 1);
    let e = send_raw(b"GARBAGE!garbage garbage!", &[]).unwrap_err();
    assert!(
        matches!(e, LocalUpdateError::BadMagic(m) if &m == b"GARBAGE!"),
        "{e}"
    );
    let e = send_raw(&frame(1, 9, 1, good.len() as u64), &[]).unwrap_err();
    assert!(matches!(e, LocalUpdateError::BadVersion(9)), "{e}");
    let e = send_raw(&frame(2, 1, 1, 0), &[]).unwrap_err();
    assert!(
        matches!(e, LocalUpdateError::UnexpectedMessage { got: 2, .. }),
        "{e}"
    );
    let e = send_raw(&table(1, &good), &[]).unwrap_err();
    assert!(
        matches!(e, LocalUpdateError::FdCount { blocks: 1, fds: 0 }),
        "{e}"
    );
    let e = send_raw(&table(1, &good), &[&mem, &mem]).unwrap_err();
    assert!(
        matches!(e, LocalUpdateError::FdCount { blocks: 1, fds: 2 }),
        "{e}"
    );
    let e = send_raw(&table(MAX_BLOCKS as u32 + 1, &good), &[]).unwrap_err();
    assert!(
        matches!(e, LocalUpdateError::TooManyBlocks { count: 65 }),
        "{e}"
    );
    let e = send_raw(&frame(1, 1, 1, 1 << 40), &[&mem]).unwrap_err();
    assert!(matches!(e, LocalUpdateError::TooLong { .. }), "{e}");
    let many: Vec<&LinuxMemory> = vec![&mem; MAX_BLOCKS + 1];
    let e = send_raw(&table(1, &good), &many).unwrap_err();
    assert!(matches!(e, LocalUpdateError::TooManyFds), "{e}");
    // Truncated: the frame promises more body than arrives.
    let mut cut = frame(1, 1, 1, good.len() as u64);
    cut.extend_from_slice(&good[..10]);
    let e = send_raw(&cut, &[&mem]).unwrap_err();
    assert!(
        matches!(e, LocalUpdateError::Truncated { got: 10, .. }),
        "{e}"
    );
    let e = send_raw(&frame(1, 1, 1, 0)[..10], &[]).unwrap_err();
    assert!(
        matches!(e, LocalUpdateError::Truncated { got: 10, .. }),
        "{e}"
    );
    // Bad entries.
    let bad_entry = |body: Vec<u8>| send_raw(&table(1, &body), &[&mem]).unwrap_err();
    for (body, says) in [
        (entry("", 1, 2 * MIB), "empty"),
        (entry("pc.ram", 9, 2 * MIB), "backing kind"),
        (entry("pc.ram", 1, 0), "non-zero"),
        (entry("pc.ram", 1, 4097), "multiple"),
        (entry("pc\0ram", 1, 2 * MIB), "NUL"),
        (entry("pc.ram", 1, 2 * MIB)[..20].to_vec(), "bytes left"),
    ] {
        let e = bad_entry(body);
        assert!(
            matches!(&e, LocalUpdateError::BadEntry { index: 0, why } if why.contains(says)),
            "{says}: {e}"
        );
    }
    let mut two = good.clone();
    two.extend_from_slice(&good);
    let e = send_raw(&table(2, &two), &[&mem, &mem]).unwrap_err();
    assert!(
        matches!(&e, LocalUpdateError::BadEntry { index: 1, why } if why.contains("twice")),
        "{e}"
    );
    let mut trailing = good.clone();
    trailing.push(0);
    let e = send_raw(&table(1, &trailing), &[&mem]).unwrap_err();
    assert!(
        matches!(e, LocalUpdateError::TrailingBytes { extra: 1, .. }),
        "{e}"
    );
}

#[test]
fn a_table_that_lies_about_its_fds_does_not_map() {
    let small = MemoryBuilder::memfd(ByteLen(2 * MIB)).build().unwrap();
    let (tx, rx) = pair();
    // Claims 4 MiB behind a 2 MiB memfd: mapping it would SIGBUS on the tail.
    let mut lie = describe("pc.ram", &small);
    lie.used = ByteLen(4 * MIB);
    lie.max = ByteLen(4 * MIB);
    send_table(&tx, &[(lie, &small)]).unwrap();
    let r = receive_table(&rx).unwrap().pop().unwrap();
    let e = r.map(false).unwrap_err();
    assert!(
        matches!(
            &e,
            LocalUpdateError::Map {
                error: ramblock_linux::Error::FileTooSmall { .. },
                ..
            }
        ),
        "{e}"
    );
    // Claims a hugetlb memfd; the fd is a plain memfd.
    let mut lie = describe("pc.ram", &small);
    lie.kind = BackingKind::Memfd(Some(PageSize::SIZE_2M));
    lie.page_size = PageSize::SIZE_2M;
    send_table(&tx, &[(lie, &small)]).unwrap();
    let r = receive_table(&rx).unwrap().pop().unwrap();
    let e = r.map(false).unwrap_err();
    assert!(
        matches!(
            &e,
            LocalUpdateError::Map {
                error: ramblock_linux::Error::SharedFdKind { .. },
                ..
            }
        ),
        "{e}"
    );
    // A peer that sends nothing: the read timeout ends the wait.
    rx.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    assert!(matches!(
        receive_table(&rx),
        Err(LocalUpdateError::TimedOut { .. })
    ));
    let _ = (&tx).flush();
}
