//! Why a local update rebuilds the VM instead of passing its fds: KVM
//! binds a VM to the address space (`mm`) of the process that created it,
//! and answers `EIO` to every VM and vCPU ioctl from any other process
//! (`kvm_vcpu_ioctl`/`kvm_vm_ioctl`: `if (kvm->mm != current->mm) return
//! -EIO`). A forked child holds the same fds as one received over
//! `SCM_RIGHTS` would be, in a different `mm`: its `KVM_GET_REGS`,
//! `KVM_RUN`, `KVM_CREATE_VCPU` and `KVM_SET_USER_MEMORY_REGION` all fail
//! with `EIO`, while the parent's still work.

use kvm_ioctls::Kvm;

/// What the child reports: 0 if the call worked, else its errno.
fn code(r: Result<impl Sized, kvm_ioctls::Error>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.errno(),
    }
}

#[test]
fn vm_and_vcpu_fds_fail_with_eio_in_another_process() {
    if !std::path::Path::new("/dev/kvm").exists() {
        return println!("skipped: no /dev/kvm");
    }
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.get_regs().unwrap();
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: 0,
        userspace_addr: 0,
    };
    // SAFETY: the child only makes ioctls on fds it inherited and exits
    // with `_exit`, which is async-signal-safe, as a child of a
    // multi-threaded process must be.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let codes = [
            code(vcpu.get_regs()),
            code(vcpu.run().map(drop)),
            code(vm.create_vcpu(1).map(drop)),
            // SAFETY: a zero-sized slot deletes nothing that exists and
            // maps no memory.
            code(unsafe { vm.set_user_memory_region(region) }),
        ];
        let all_eio = codes.iter().all(|&c| c == libc::EIO);
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(if all_eio { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a live local.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status));
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "every VM and vCPU ioctl from the child must fail with EIO"
    );
    // The creator's fds still work.
    vcpu.get_regs().unwrap();
    vm.create_vcpu(1).unwrap();
}
