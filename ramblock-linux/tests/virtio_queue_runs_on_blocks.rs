//! rust-vmm code nobody here wrote runs on ramblock memory: virtio-queue's
//! mock driver lays descriptor chains out in a memfd block (through
//! vm-memory), and a device built on virtio-queue's `Queue`, `Reader` and
//! `Writer` reads each request and writes its response buffers and the used
//! ring through vm-memory. The harvested migration bitmap equals exactly the
//! pages the device wrote (a model of the writes), and a live migration
//! during which the device keeps writing moves the memory byte for byte.

use ramblock_core::addr::ByteLen;
use ramblock_core::bitmap::Owned;
use ramblock_core::dirty_log::SoftwareOnly;
use ramblock_core::flags::BlockFlags;
use ramblock_core::migrate::receiver::{send_ack, Receiver, BOUNCE_BYTES};
use ramblock_core::migrate::{migrate, MigrationHost, PassReport, PrecopyConfig};
use ramblock_core::stream::io::IoStream;
use ramblock_core::{BlockBitmaps, BlockName, BlockSpec, RamBlock, RamList};
use ramblock_linux::guest_memory::{guest_ram, BlockRegion, GuestRam};
use ramblock_linux::{LinuxMemory, MemoryBuilder};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// virtio 1.x split-ring descriptor flags (virtio_ring.h).
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// The block's second half sits at 4 GiB, above a PCI hole.
const HIGH: u64 = 1 << 32;
const QUEUE_AT: u64 = 0x1000;
const QUEUE_LEN: u16 = 128;

type List = RamList<'static, LinuxMemory, Owned, 4>;
type Ram<'a> = GuestRam<'a, LinuxMemory, Owned>;

fn list() -> List {
    let list = List::new();
    let mem = MemoryBuilder::memfd(ByteLen(8 * MIB))
        .shared(true)
        .build()
        .unwrap();
    let spec = BlockSpec::new(BlockName::new("pc.ram").unwrap(), ByteLen(8 * MIB))
        .flags(mem.flags() | BlockFlags::MIGRATABLE);
    let bitmaps = BlockBitmaps::for_spec(&spec).unwrap();
    list.add(spec, mem, bitmaps).map_err(|r| r.error).unwrap();
    list
}

/// Low 4 MiB at 0, high 4 MiB at 4 GiB.
fn guest(block: &RamBlock<LinuxMemory, Owned>) -> Ram<'_> {
    let half = ByteLen(4 * MIB);
    guest_ram(vec![
        BlockRegion::range(block, GuestAddress(0), ByteLen(0), half).unwrap(),
        BlockRegion::range(block, GuestAddress(HIGH), half, half).unwrap(),
    ])
    .unwrap()
}

/// The block page a guest-physical address falls in.
fn page_of(gpa: u64) -> usize {
    let off = if gpa >= HIGH {
        gpa - HIGH + 4 * MIB
    } else {
        gpa
    };
    (off / PAGE) as usize
}

/// A request: fill `len` response bytes with `seed + i`.
fn request(seed: u64, len: u32) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[..8].copy_from_slice(&seed.to_le_bytes());
    r[8..12].copy_from_slice(&len.to_le_bytes());
    r
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (seed as usize + i) as u8 | 1).collect()
}

/// One chain the driver posts: the request, then response buffers
/// (gpa, len) that the response fills in order.
struct Chain {
    req_at: u64,
    seed: u64,
    fill: u32,
    bufs: Vec<(u64, u32)>,
}

/// The driver's side, through virtio-queue's mock: requests written into
/// guest memory, descriptors from index `first`, heads in the avail ring.
fn post(mock: &MockSplitQueue<'_, Ram<'_>>, mem: &Ram<'_>, chains: &[Chain], first: u16) {
    let mut descs = Vec::new();
    for c in chains {
        mem.write_slice(&request(c.seed, c.fill), GuestAddress(c.req_at))
            .unwrap();
        let mut idx = first + descs.len() as u16;
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            c.req_at,
            16,
            F_NEXT,
            idx + 1,
        )));
        for (k, &(at, len)) in c.bufs.iter().enumerate() {
            idx += 1;
            let last = k + 1 == c.bufs.len();
            let flags = if last { F_WRITE } else { F_WRITE | F_NEXT };
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                at,
                len,
                flags,
                idx + 1,
            )));
        }
    }
    mock.add_desc_chains(&descs, first).unwrap();
}

/// The device: pops every available chain, reads its request, writes the
/// response through virtio-queue's `Writer`, and adds it to the used ring.
/// Returns the pages it wrote (the model) in the order it wrote them.
fn serve(queue: &mut Queue, mem: &Ram<'_>) -> Vec<usize> {
    let mut wrote = Vec::new();
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let mut reader = chain.clone().reader(mem).unwrap();
        let mut writer = chain.clone().writer(mem).unwrap();
        let mut req = [0u8; 16];
        reader.read_exact(&mut req).unwrap();
        let seed = u64::from_le_bytes(req[..8].try_into().unwrap());
        let fill = u32::from_le_bytes(req[8..12].try_into().unwrap()) as usize;
        // The model: the bytes land in the writable descriptors in order.
        let mut left = fill;
        for d in chain.clone().writable() {
            let n = left.min(d.len() as usize);
            if n > 0 {
                let a = d.addr().0;
                (page_of(a)..=page_of(a + n as u64 - 1)).for_each(|p| wrote.push(p));
            }
            left -= n;
        }
        writer.write_all(&pattern(seed, fill)).unwrap();
        let used_before = queue.next_used();
        queue.add_used(mem, head, fill as u32).unwrap();
        // add_used writes the element and the used index.
        let elem = queue.used_ring() + 4 + 8 * u64::from(used_before % QUEUE_LEN);
        wrote.push(page_of(elem));
        wrote.push(page_of(queue.used_ring() + 2));
    }
    wrote
}

fn chains(seed: u64) -> Vec<Chain> {
    // Requests low, responses high, at odd offsets and across pages and
    // descriptors; some buffers are left partly unwritten.
    (0..8)
        .map(|i| {
            let base = HIGH + (seed * 128 + i * 11) * PAGE + 100 * i;
            Chain {
                req_at: MIB + (seed * 8 + i) * 64,
                seed: seed * 1000 + i,
                fill: 6000 * (i as u32 % 3) + 1 + 613 * i as u32,
                bufs: vec![
                    (base, 5000),
                    (base + 3 * PAGE, 9000),
                    (base + 9 * PAGE, 4096),
                ],
            }
        })
        .collect()
}

/// Takes whatever is marked now and returns the migration bitmap's pages.
fn harvest(block: &RamBlock<LinuxMemory, Owned>) -> Vec<usize> {
    block.sync_dirty_log(&mut SoftwareOnly).unwrap();
    let mut m = block.migration();
    let pages: Vec<usize> = m.bitmap.dirty_pages(0).collect();
    let len = m.bitmap.len();
    m.bitmap.clear_range(0, len).unwrap();
    pages
}

#[test]
fn a_virtio_device_dirties_exactly_the_pages_it_writes() {
    let list = list();
    let view = list.read();
    let block = view.by_name("pc.ram").unwrap();
    let mem = guest(block);
    assert_eq!(mem.num_regions(), 2);
    let mock = MockSplitQueue::create(&mem, GuestAddress(QUEUE_AT), QUEUE_LEN);
    let mut queue: Queue = mock.create_queue().unwrap();
    for round in 0..3u64 {
        let posted = chains(round);
        post(&mock, &mem, &posted, round as u16 * 32);
        // What the driver wrote is the guest's (KVM's log would see it);
        // take it so only the device's writes remain.
        harvest(block);
        let mut model = serve(&mut queue, &mem);
        model.sort_unstable();
        model.dedup();
        assert_eq!(harvest(block), model, "round {round}");
        // The responses and the used ring read back as the device wrote them.
        for (i, c) in posted.iter().enumerate() {
            let mut got = Vec::new();
            for &(at, len) in &c.bufs {
                let mut b = vec![0u8; len as usize];
                mem.read_slice(&mut b, GuestAddress(at)).unwrap();
                got.extend(b);
            }
            assert_eq!(
                got[..c.fill as usize],
                pattern(c.seed, c.fill as usize)[..],
                "chain {i}"
            );
        }
        let used_idx: u16 = mem.read_obj(GuestAddress(mock.used_addr().0 + 2)).unwrap();
        assert_eq!(used_idx, (round as u16 + 1) * 8);
    }
}

/// The source's side of the migration: no vCPU to pause; `hook` runs
/// after each pass.
struct Host<'h> {
    t0: Instant,
    hook: Box<dyn FnMut(u32) + 'h>,
}

impl MigrationHost for Host<'_> {
    fn now_ns(&mut self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }
    fn sleep_ns(&mut self, ns: u64) {
        std::thread::sleep(std::time::Duration::from_nanos(ns));
    }
    fn pause_guest(&mut self) {}
    fn resume_guest(&mut self) {}
    fn set_throttle(&mut self, _percent: u8) {}
    fn pass_done(&mut self, r: &PassReport) {
        (self.hook)(r.pass);
    }
}

fn contents(list: &List) -> Vec<u8> {
    let view = list.read();
    let block = view.by_name("pc.ram").unwrap();
    let mut v = vec![0u8; block.used_length().0 as usize];
    block.read(ByteLen(0), &mut v).unwrap();
    v
}

#[test]
fn memory_a_virtio_device_writes_during_migration_arrives_byte_for_byte() {
    let src = list();
    let dst = list();
    let (a, b) = UnixStream::pair().unwrap();
    let stats = std::thread::scope(|s| {
        // Owned here so a failing assertion closes the source's end and the
        // receiver sees the stream end instead of waiting forever.
        let a = a;
        let rx = s.spawn(|| {
            let mut bounce = vec![0u8; BOUNCE_BYTES];
            let mut rx = Receiver::new(&mut bounce).unwrap();
            let mut reader = IoStream(std::io::BufReader::new(b.try_clone().unwrap()));
            let result = rx.receive(&dst, &mut reader, |_| {});
            let _ = send_ack(&mut IoStream(&b), &result);
            result.map(drop).map_err(|e| e.to_string())
        });
        let view = src.read();
        let block = view.by_name("pc.ram").unwrap();
        let mem = guest(block);
        let mock = MockSplitQueue::create(&mem, GuestAddress(QUEUE_AT), QUEUE_LEN);
        let mut queue: Queue = mock.create_queue().unwrap();
        post(&mock, &mem, &chains(0), 0);
        serve(&mut queue, &mem);
        // After passes 0 and 1 the driver posts, and the device serves, a
        // new batch: only later passes can carry those writes over.
        let mut served = 0;
        let mut host = Host {
            t0: Instant::now(),
            hook: Box::new(|pass| {
                if pass < 2 {
                    let round = u64::from(pass) + 1;
                    post(&mock, &mem, &chains(round), round as u16 * 32);
                    assert!(!serve(&mut queue, &mem).is_empty());
                    served += 1;
                }
            }),
        };
        let cfg = PrecopyConfig {
            downtime_limit_ns: 0,
            max_passes: 4,
            ..PrecopyConfig::default()
        };
        let mut out = IoStream(std::io::BufWriter::new(a.try_clone().unwrap()));
        let mut ack = IoStream(a.try_clone().unwrap());
        let mut buf = vec![0u8; 64 * 4096];
        let stats = migrate(
            &src,
            &mut SoftwareOnly,
            &mut out,
            &mut ack,
            &mut host,
            cfg,
            &mut buf,
        );
        drop(host);
        assert_eq!(served, 2, "the device served during the migration");
        out.0.flush().unwrap();
        rx.join().unwrap().unwrap();
        stats.unwrap()
    });
    assert!(stats.passes >= 3, "{stats:?}");
    let (got, want) = (contents(&dst), contents(&src));
    let differing = got.iter().zip(&want).filter(|(g, w)| g != w).count();
    assert_eq!(differing, 0, "bytes differ after the migration");
    // The device's last responses are there (not zero pages).
    let last = &chains(2)[7];
    let at = (page_of(last.bufs[0].0) as u64 * PAGE + last.bufs[0].0 % PAGE) as usize;
    assert_eq!(got[at..at + 64], pattern(last.seed, 64)[..]);
}
