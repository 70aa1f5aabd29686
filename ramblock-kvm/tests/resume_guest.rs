//! Post-copy switch-over for the CPL 3 workload: a paused source vCPU's
//! state, shipped as bytes, resumes the guest on a fresh VM holding a copy
//! of the source's RAM, and the destination's RAM is then verified against
//! the source byte for byte although the guest kept writing to it.
//!
//! The KVM test prints `skipped: no /dev/kvm` without KVM; the model tests
//! of [`check_resumed_increment`] run on plain buffers either way.
mod common;

use common::*;
use ramblock_core::addr::ByteLen;
use ramblock_core::region::HostRegion;
use ramblock_kvm::guest::{
    check_resumed_increment, ExpectedDelta, ResumeMismatch, ResumedDelta, Workload, HEARTBEAT_PORT,
    WORKLOAD_FIRST,
};
use ramblock_kvm::memslot::BlockRange;
use ramblock_kvm::mode::DirtyLogRequest;
use ramblock_kvm::runner::VcpuRunner;
use ramblock_kvm::vcpu::VcpuEvent;
use ramblock_kvm::vcpu_state::VcpuState;
use ramblock_kvm::GuestError;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;
const FIRST_PAGE: u64 = WORKLOAD_FIRST / PAGE;

/// A region over a test's buffer.
fn buffer_region(buf: &mut [u8]) -> HostRegion<'_> {
    HostRegion::from_mut_slice(buf)
}

/// The model: what the workload does to `ram` when it resumes at page
/// `next` and runs `increments` more `inc`s.
fn run_model(ram: &mut [u8], work: &Workload, next: u64, increments: u64) {
    let pages = work.pages();
    for k in 0..increments {
        let page = FIRST_PAGE + (next + k) % pages;
        let b = &mut ram[(page * PAGE) as usize];
        *b = b.wrapping_add(1);
    }
}

/// Deterministic noise, so no byte is special.
fn noise(len: usize, mut x: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn the_check_accepts_exactly_what_the_model_loop_produces() {
    const PAGES: u64 = 6;
    let work = Workload::new(WORKLOAD_FIRST + PAGES * PAGE).unwrap();
    // Two pages above the workload's top: memory it must never touch.
    let source = noise((work.top + 2 * PAGE) as usize, 1);
    let mut src = source.clone();
    let increments = (0..3 * PAGES + 2).chain([255 * PAGES + PAGES - 1, 256 * PAGES + 3]);
    for next in 0..PAGES {
        for k in increments.clone() {
            let mut dst = source.clone();
            run_model(&mut dst, &work, next, k);
            let what = format!("resumed at page {next}, {k} increments");
            let got = check_resumed_increment(
                &buffer_region(&mut src),
                &buffer_region(&mut dst),
                &work,
                next,
            );
            let want = ResumedDelta {
                full_passes: (k / PAGES) as u8,
                extra_pages: k % PAGES,
            };
            // Runs that wrap past the last page (page 4, 3 increments:
            // pages 4, 5, 0) are among these.
            assert_eq!(got, Ok(want), "{what}");
            // Anchored at `next`: no other start fits a non-empty run.
            for wrong in (0..PAGES).filter(|&p| p != next && k % PAGES != 0) {
                assert!(
                    check_resumed_increment(
                        &buffer_region(&mut src),
                        &buffer_region(&mut dst),
                        &work,
                        wrong
                    )
                    .is_err(),
                    "{what}, checked as if resumed at {wrong}"
                );
            }
        }
    }
}

#[test]
fn the_check_names_the_first_page_that_breaks_the_pattern() {
    const PAGES: u64 = 6;
    let work = Workload::new(WORKLOAD_FIRST + PAGES * PAGE).unwrap();
    let source = noise((work.top + 2 * PAGE) as usize, 2);
    let mut src = source.clone();
    let check = |src: &mut [u8], dst: &mut [u8], next| {
        check_resumed_increment(&buffer_region(src), &buffer_region(dst), &work, next)
    };
    // Resumed at page 4, two passes and 3 pages more: the run wraps
    // (pages 4, 5, 0 got 3, pages 1, 2, 3 got 2).
    let mut dst = source.clone();
    run_model(&mut dst, &work, 4, 2 * PAGES + 3);
    assert_eq!(
        check(&mut src, &mut dst, 4),
        Ok(ResumedDelta {
            full_passes: 2,
            extra_pages: 3
        })
    );

    // A byte the workload never writes: below its pages, inside one of
    // them, above its top.
    for offset in [0x5123, WORKLOAD_FIRST + 2 * PAGE + 100, work.top + PAGE + 1] {
        let mut bad = dst.clone();
        bad[offset as usize] ^= 0x40;
        assert_eq!(
            check(&mut src, &mut bad, 4),
            Err(ResumeMismatch::Byte {
                page: offset / PAGE,
                offset,
                source_byte: source[offset as usize],
                destination_byte: source[offset as usize] ^ 0x40,
            }),
            "byte {offset:#x}"
        );
    }

    // A first byte off by 5, inside the run and after it.
    for (index, expected) in [
        (
            5,
            ExpectedDelta::RunOrAfter {
                run: 3,
                after_run: 2,
            },
        ),
        (2, ExpectedDelta::Exactly(2)),
    ] {
        let mut bad = dst.clone();
        let at = ((FIRST_PAGE + index) * PAGE) as usize;
        bad[at] = bad[at].wrapping_add(5);
        assert_eq!(
            check(&mut src, &mut bad, 4),
            Err(ResumeMismatch::Increment {
                page: FIRST_PAGE + index,
                source_byte: source[at],
                destination_byte: bad[at],
                found: bad[at].wrapping_sub(source[at]),
                expected,
            }),
            "page index {index}"
        );
    }

    // A page the run skipped: page 5 got only the base increment, so the
    // run seems to end there and page 0, still in it, breaks the pattern.
    // (Page 0 missing instead would be a shorter run, which is valid.)
    let mut skipped = dst.clone();
    let at = ((FIRST_PAGE + 5) * PAGE) as usize;
    skipped[at] = skipped[at].wrapping_sub(1);
    assert!(matches!(
        check(&mut src, &mut skipped, 4),
        Err(ResumeMismatch::Increment { page, expected: ExpectedDelta::Exactly(2), .. })
            if page == FIRST_PAGE
    ));
    let at = (FIRST_PAGE * PAGE) as usize;
    skipped[at] = skipped[at].wrapping_sub(1);
    assert_eq!(
        check(&mut src, &mut skipped, 4),
        Ok(ResumedDelta {
            full_passes: 2,
            extra_pages: 1
        })
    );

    // Nonsense arguments are errors, not panics.
    let mut short = dst[..work.top as usize - 1].to_vec();
    assert!(matches!(
        check(&mut src, &mut short, 4),
        Err(ResumeMismatch::Size { .. })
    ));
    assert_eq!(
        check(&mut src, &mut dst, PAGES),
        Err(ResumeMismatch::NextPage {
            next_page: PAGES,
            pages: PAGES
        })
    );
}

const RAM: u64 = 8 << 20;

fn snapshot_of(region: &HostRegion<'_>) -> Vec<u8> {
    let mut copy = vec![0u8; region.len()];
    region.read(ByteLen::ZERO, &mut copy).unwrap();
    copy
}

#[test]
fn a_guest_resumed_from_shipped_state_continues_where_it_stopped() {
    if !kvm_or_skip() {
        return;
    }
    let list = List::new();
    add(&list, "a.ram", RAM, |s| s);
    add(&list, "b.ram", RAM, |s| s);
    let vm_a = Arc::new(vm(DirtyLogRequest::Auto));
    let vm_b = Arc::new(vm(DirtyLogRequest::Auto));
    {
        let view = list.read();
        map(&vm_a, view.by_name("a.ram").unwrap(), 0, BlockRange::Whole).unwrap();
        map(&vm_b, view.by_name("b.ram").unwrap(), 0, BlockRange::Whole).unwrap();
    }
    let (ram_a, ram_b) = (region(&list, "a.ram"), region(&list, "b.ram"));
    let work = Workload::new(RAM).unwrap();

    // Source: run, then pause at whatever point the kick lands.
    let vcpu_a = vm_a.create_vcpu(0).unwrap();
    work.load(&ram_a, &vcpu_a).unwrap();
    let source = VcpuRunner::spawn(vm_a.clone(), vcpu_a).unwrap();
    assert!(matches!(
        source.snapshot(),
        Err(GuestError::NotPaused {
            state: "running",
            ..
        })
    ));
    wait_for_heartbeats(&source, 2);
    source.pause();
    let paused_ram = snapshot_of(&ram_a);
    let beats = source.heartbeats();
    let state = source.snapshot().unwrap();
    // Taking it ran no guest code: same state again (but for the TSC,
    // a clock that runs while the guest is paused, and only forward),
    // same memory, same heartbeats, still paused.
    std::thread::sleep(Duration::from_millis(20));
    let same_state = |again: VcpuState| {
        assert!(
            again.tsc().unwrap() >= state.tsc().unwrap(),
            "the TSC went back"
        );
        assert_eq!(again.comparable(), state.clone().comparable());
    };
    same_state(source.snapshot().unwrap());
    // From several threads at once, each gets its own answer.
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..50 {
                    same_state(source.snapshot().unwrap());
                }
            });
        }
    });
    assert!(source.is_paused());
    assert_eq!(source.heartbeats(), beats);
    assert!(
        snapshot_of(&ram_a) == paused_ram,
        "snapshot moved the guest"
    );

    // Switch-over: the state crosses as bytes, RAM as a copy.
    let blob = state.to_bytes();
    let received = VcpuState::from_bytes(&blob).unwrap();
    assert_eq!(received, state);
    let next = work.next_page_index(&received).unwrap();
    println!(
        "source paused after {beats} passes at rip {:#x} ebx {:#x}: next page {next}",
        received.regs.rip, received.regs.rbx
    );
    ram_b.write(ByteLen::ZERO, &paused_ram).unwrap();
    let vcpu_b = vm_b.create_vcpu(0).unwrap();
    vcpu_b.restore(&received).unwrap();
    let destination = VcpuRunner::spawn(vm_b.clone(), vcpu_b).unwrap();
    wait_for_heartbeats(&destination, 2);
    // Stop mid-pass, most likely.
    std::thread::sleep(Duration::from_micros(300));
    destination.pause();
    let end = destination.snapshot().unwrap();
    let dest_beats = destination.heartbeats();

    let delta = check_resumed_increment(&ram_a, &ram_b, &work, next)
        .unwrap_or_else(|e| panic!("destination after {dest_beats} heartbeats: {e}"));
    println!("destination: {dest_beats} heartbeats, {delta:?}");
    let pages = work.pages();
    // The memory agrees with where the destination's vCPU says it stopped.
    assert_eq!(
        work.next_page_index(&end).unwrap(),
        (next + delta.extra_pages) % pages,
        "{end:x?}"
    );
    // And with its heartbeats: one per pass that ended at the last page,
    // give or take the `out` in flight at either end.
    let ended = delta
        .full_passes
        .wrapping_add(u8::from(next + delta.extra_pages >= pages));
    let off = (dest_beats as u8).wrapping_sub(ended);
    assert!(
        matches!(off, 255 | 0 | 1),
        "{dest_beats} heartbeats, {ended} passes ended"
    );
    if delta.extra_pages > 0 {
        assert!(
            check_resumed_increment(&ram_a, &ram_b, &work, (next + 1) % pages).is_err(),
            "a run from the wrong page must not pass"
        );
    }

    // Corrupt the paused destination, one byte at a time.
    let far = FIRST_PAGE + (next + pages / 2) % pages;
    let flip = |offset: u64, by: u8| {
        let offset = ByteLen(offset);
        let mut b = [0u8];
        ram_b.read(offset, &mut b).unwrap();
        ram_b.write(offset, &[b[0].wrapping_add(by)]).unwrap();
        let got = check_resumed_increment(&ram_a, &ram_b, &work, next);
        ram_b.write(offset, &b).unwrap();
        got
    };
    let inside = far * PAGE + 100;
    assert!(matches!(
        flip(inside, 1),
        Err(ResumeMismatch::Byte { page, offset, .. }) if page == far && offset == inside
    ));
    assert!(matches!(
        flip(far * PAGE, 5),
        Err(ResumeMismatch::Increment { page, found, .. })
            if page == far && (found == delta.full_passes.wrapping_add(5)
                || found == delta.full_passes.wrapping_add(6))
    ));
    assert!(matches!(
        flip(0x1008, 0x80),
        Err(ResumeMismatch::Byte {
            page: 1,
            offset: 0x1008,
            ..
        })
    ));
    assert_eq!(
        check_resumed_increment(&ram_a, &ram_b, &work, next),
        Ok(delta)
    );

    for runner in [source, destination] {
        let (vcpu, err) = runner.stop();
        assert!(err.is_none(), "{err:?}");
        assert!(vcpu.is_some());
    }
}

#[test]
fn a_stopped_runner_refuses_a_snapshot() {
    if !kvm_or_skip() {
        return;
    }
    // The workload's first page lies outside the only memslot, so its
    // first `inc` is an MMIO exit the runner stops on.
    let list = List::new();
    add(&list, "low", WORKLOAD_FIRST, |s| s);
    let vm = Arc::new(vm(DirtyLogRequest::Auto));
    {
        let view = list.read();
        map(&vm, view.by_name("low").unwrap(), 0, BlockRange::Whole).unwrap();
    }
    let vcpu = vm.create_vcpu(0).unwrap();
    let work = Workload::new(WORKLOAD_FIRST + PAGE).unwrap();
    work.load(&region(&list, "low"), &vcpu).unwrap();
    let runner = VcpuRunner::spawn(vm.clone(), vcpu).unwrap();
    let start = Instant::now();
    while runner.error().is_none() {
        assert!(start.elapsed() < Duration::from_secs(60), "never stopped");
        std::thread::sleep(Duration::from_millis(2));
    }
    runner.pause();
    assert!(matches!(
        runner.snapshot(),
        Err(GuestError::NotPaused {
            state: "stopped",
            ..
        })
    ));
}

#[test]
fn a_state_saved_at_a_heartbeat_exit_resumes_with_the_next_pass() {
    if !kvm_or_skip() {
        return;
    }
    let list = List::new();
    let (vm_a, vm_b) = two_vms(&list, RAM);
    let (ram_a, ram_b) = (region(&list, "a.ram"), region(&list, "b.ram"));
    let work = Workload::new(RAM).unwrap();
    let mut vcpu_a = vm_a.create_vcpu(0).unwrap();
    work.load(&ram_a, &vcpu_a).unwrap();
    // Run to the end of the first pass. KVM may leave the `out` half done
    // (rip still on it) until the vCPU next enters KVM_RUN, or may have
    // stepped over it already (seen on nested hosts, where it emulates).
    loop {
        match vcpu_a.run(&vm_a).unwrap() {
            VcpuEvent::IoOut { port, .. } if port == HEARTBEAT_PORT => break,
            VcpuEvent::Interrupted => continue,
            other => panic!("{other:?}"),
        }
    }
    // SAFETY: KVM_GET_REGS writes only into the struct kvm-ioctls returns.
    let at_exit = unsafe { vcpu_a.fd() }.get_regs().unwrap();
    let ram = snapshot_of(&ram_a);
    let state = vcpu_a.save().unwrap();
    // Saving completed the `out` at most: rip moved past it (2 bytes) or
    // not at all, nothing else changed, and no page was written.
    let stepped = state.regs.rip.wrapping_sub(at_exit.rip);
    assert!(stepped == 0 || stepped == 2, "{at_exit:x?} -> {state:x?}");
    assert_eq!(
        kvm_bindings::kvm_regs {
            rip: at_exit.rip,
            ..state.regs
        },
        at_exit
    );
    assert!(snapshot_of(&ram_a) == ram, "saving ran guest code");
    // The guest's own code says where rip is: on the `out` (0xe6) or past it.
    let opcode = |rip: u64| {
        let mut b = [0u8];
        ram_a.read(ByteLen(rip), &mut b).unwrap();
        b[0]
    };
    let on_out = opcode(state.regs.rip) == 0xe6;
    println!(
        "rip on the out at the exit: {}, after the save: {on_out}",
        opcode(at_exit.rip) == 0xe6
    );
    assert_eq!(work.next_page_index(&state).unwrap(), 0);

    ram_b.write(ByteLen::ZERO, &ram).unwrap();
    let mut vcpu_b = vm_b.create_vcpu(0).unwrap();
    vcpu_b
        .restore(&VcpuState::from_bytes(&state.to_bytes()).unwrap())
        .unwrap();
    loop {
        match vcpu_b.run(&vm_b).unwrap() {
            VcpuEvent::IoOut { port, .. } if port == HEARTBEAT_PORT => break,
            VcpuEvent::Interrupted => continue,
            other => panic!("{other:?}"),
        }
    }
    // The destination's first heartbeat ends one whole pass, or, if it had
    // to finish the source's `out` itself, comes before any write.
    let passes = u8::from(!on_out);
    assert_eq!(
        check_resumed_increment(&ram_a, &ram_b, &work, 0),
        Ok(ResumedDelta {
            full_passes: passes,
            extra_pages: 0
        })
    );
}
