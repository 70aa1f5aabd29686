//! A VMM's memory setup with ramblock, start to finish: guest RAM as a memfd
//! block, KVM memslots with dirty logging, a vm-memory view of the RAM
//! handed to a virtio device (virtio-queue), a guest writing pages, and a
//! live migration to a second VM in the same process, verified. Run it with
//! `cargo run -p ramblock-kvm --example vmm_memory` (needs /dev/kvm).
use ramblock_core::migrate::receiver::{send_ack, Receiver, BOUNCE_BYTES};
use ramblock_core::migrate::{migrate, MigrationHost, PrecopyConfig};
use ramblock_core::{addr::ByteLen, bitmap::Owned, BlockBitmaps, BlockName, BlockSpec, RamList};
use ramblock_core::{flags::BlockFlags, stream::io::IoStream};
use ramblock_kvm::{dirty::KvmDirtyLog, guest::PageWriter, memslot::BlockRange, vm::Vm};
use ramblock_linux::guest_memory::{guest_ram, BlockRegion};
use ramblock_linux::{LinuxMemory, MemoryBuilder};
use std::{io::Read, io::Write, os::unix::net::UnixStream};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{mock::MockSplitQueue, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

type Ram = RamList<'static, LinuxMemory, Owned, 8>;
type Res<T> = Result<T, Box<dyn std::error::Error>>;
const RAM: u64 = 16 << 20;
const QUEUE: u64 = 0x10_0000; // the virtqueue's rings
const REQUEST: u64 = 0x20_0000; // a request the driver posts
const RESPONSE: u64 = 0x30_0000; // where the device answers

/// A VM's RAM: one memfd block (shareable with a vhost-user backend).
fn ram() -> Res<&'static Ram> {
    let list: &'static Ram = Box::leak(Box::new(RamList::new()));
    let memory = MemoryBuilder::memfd(ByteLen(RAM)).name("pc.ram").build()?;
    let spec = BlockSpec::new(BlockName::new("pc.ram")?, ByteLen(RAM))
        .flags(memory.flags() | BlockFlags::MIGRATABLE);
    let bitmaps = BlockBitmaps::for_spec(&spec)?;
    list.add(spec, memory, bitmaps).map_err(|r| r.error)?;
    Ok(list)
}

/// A VM with the RAM at guest-physical 0, dirty logging on.
fn vm(ram: &'static Ram) -> Res<Vm> {
    let (vm, view) = (Vm::new()?, ram.read());
    let block = view.by_name("pc.ram").ok_or("no RAM")?;
    // SAFETY: the list is leaked and its block never removed, so the memory
    // behind the slot outlives the VM.
    let slot = unsafe { vm.map_block(block, 0, BlockRange::Whole)? };
    vm.set_logging(slot, true)?;
    Ok(vm)
}

/// A virtio device: serves every request on `queue` by writing a response
/// through vm-memory, which marks the pages dirty for migration.
fn serve<M: vm_memory::GuestMemory>(queue: &mut Queue, mem: &M) -> Res<u32> {
    let mut served = 0;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let mut request = [0u8; 8];
        chain.clone().reader(mem)?.read_exact(&mut request)?;
        let mut writer = chain.clone().writer(mem)?;
        writer.write_all(&[request[0].wrapping_add(1); 8192])?;
        queue.add_used(mem, chain.head_index(), 8192)?;
        served += 1;
    }
    Ok(served)
}

/// Guest RAM's bytes, to compare the two VMs.
fn contents(ram: &Ram) -> Res<Vec<u8>> {
    let (view, mut bytes) = (ram.read(), vec![0u8; RAM as usize]);
    view.by_name("pc.ram")
        .ok_or("no RAM")?
        .read(ByteLen(0), &mut bytes)?;
    Ok(bytes)
}

/// No vCPU runs on its own here, so nothing to pause or throttle.
struct Host(std::time::Instant);
impl MigrationHost for Host {
    fn now_ns(&mut self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
    fn sleep_ns(&mut self, ns: u64) {
        std::thread::sleep(std::time::Duration::from_nanos(ns));
    }
    fn pause_guest(&mut self) {}
    fn resume_guest(&mut self) {}
    fn set_throttle(&mut self, _percent: u8) {}
}

fn main() -> Res<()> {
    if !std::path::Path::new("/dev/kvm").exists() {
        return Err("this example runs a KVM guest: it needs /dev/kvm".into());
    }
    let (src, dst) = (ram()?, ram()?);
    let (src_vm, _dst_vm) = (vm(src)?, vm(dst)?); // the second VM receives
    let mut log = KvmDirtyLog::new(&src_vm);
    {
        let view = src.read();
        let block = view.by_name("pc.ram").ok_or("no RAM")?;
        // Send what the first harvest reports (everything, in manual-protect
        // mode) as a migration would, so what follows starts clean.
        block.sync_dirty_log(&mut log)?;
        let (info, mut sent) = (block.info(), block.migration());
        while let Some(_run) = sent.next_dirty_run(0, 1 << 20, &info, &mut log)? {}
        drop(sent);
        // The device's view of guest memory: vm-memory over the block. The
        // guest's driver posts a request: read 8 bytes, write 2 pages.
        let mem = guest_ram(vec![BlockRegion::new(block, GuestAddress(0))?])?;
        let driver = MockSplitQueue::create(&mem, GuestAddress(QUEUE), 16);
        mem.write_obj(41u64, GuestAddress(REQUEST))?;
        let chain = [(REQUEST, 8, 1, 1), (RESPONSE, 8192, 2, 0)]; // flags NEXT, WRITE
        driver.add_desc_chains(
            &chain.map(|(a, l, f, n)| Descriptor::new(a, l, f, n).into()),
            0,
        )?;
        let mut queue: Queue = driver.create_queue()?;
        println!("device served {} request(s)", serve(&mut queue, &mem)?);

        // The guest itself writes pages (its code lives in the first 16 KiB).
        let mut guest = PageWriter::new(src_vm.create_vcpu(0)?, block.region())?;
        guest.write_pages(&src_vm, &[0x50_0000, 0x50_1000, 0xa0_0000], 0x5a)?;

        // One harvest merges the guest's pages (KVM's log) with the
        // device's (vm-memory's writes): what migration sends next.
        block.sync_dirty_log(&mut log)?;
        let dirty: Vec<usize> = block.migration().bitmap.dirty_pages(0).collect();
        println!("dirty pages after the harvest: {dirty:?}");
    }

    // Live migration to the second VM over a socket pair, verified.
    let (a, b) = UnixStream::pair()?;
    let receiver = std::thread::spawn(move || {
        let mut bounce = vec![0u8; BOUNCE_BYTES];
        let mut rx = Receiver::new(&mut bounce).map_err(|e| e.to_string())?;
        let result = rx.receive(dst, &mut IoStream(std::io::BufReader::new(&b)), |_| {});
        let _ = send_ack(&mut IoStream(&b), &result);
        result.map_err(|e| e.to_string())
    });
    let mut out = IoStream(std::io::BufWriter::new(&a));
    let (mut ack, mut buf) = (IoStream(&a), vec![0u8; 64 << 12]);
    let host = &mut Host(std::time::Instant::now());
    let cfg = PrecopyConfig::default();
    let stats = migrate(src, &mut log, &mut out, &mut ack, host, cfg, &mut buf)?;
    out.0.flush()?;
    receiver.join().map_err(|_| "receiver panicked")??;
    if contents(src)? != contents(dst)? {
        return Err("the second VM's RAM differs".into());
    }
    println!(
        "migrated in {} pass(es), verified byte for byte",
        stats.passes
    );
    Ok(())
}
