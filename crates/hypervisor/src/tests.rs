//! The KVM layer against the real /dev/kvm: a few bytes of real-mode code exercise memory
//! mapping, register setup and the exits the VMM depends on.

use crate::{Hypervisor, HypervisorError, VmExit};

/// Guest-physical address where the test code is placed.
const CODE: u64 = 0x1000;

/// Maps one anonymous page at guest address 0, copies `code` to `CODE` and returns the VM, a
/// vCPU in real mode at `CODE`, and the mapping (kept alive by the caller).
fn tiny_vm(code: &[u8]) -> Option<(crate::Vm, crate::Vcpu, *mut libc::c_void)> {
    let hv = match Hypervisor::new() {
        Ok(h) => h,
        Err(HypervisorError::NoKvm) => {
            println!("SKIPPED: no /dev/kvm");
            return None;
        }
        Err(e) => panic!("{e}"),
    };
    let vm = hv.create_vm().unwrap();
    let size = 0x10000usize;
    // SAFETY: an anonymous private mapping with no address hint; checked below.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(mem, libc::MAP_FAILED);
    // SAFETY: `mem` is `size` writable bytes and `CODE + code.len()` is within them.
    unsafe {
        std::ptr::copy_nonoverlapping(
            code.as_ptr(),
            mem.cast::<u8>().add(CODE as usize),
            code.len(),
        )
    };
    // SAFETY: the mapping lives until the test process ends (it is never unmapped).
    unsafe { vm.map_memory(0, 0, size as u64, mem as u64) }.unwrap();
    vm.setup_platform().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.regs().unwrap();
    regs.rip = CODE;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    Some((vm, vcpu, mem))
}

#[test]
fn port_out_and_in_exits() {
    // mov al, 0x5a; out 0x80, al; mov dx, 0x3f8; in al, dx; mov [0x2000], al; out 0x81, al
    let code = [
        0xb0, 0x5a, 0xe6, 0x80, 0xba, 0xf8, 0x03, 0xec, 0xa2, 0x00, 0x20, 0xe6, 0x81,
    ];
    let Some((_vm, mut vcpu, _mem)) = tiny_vm(&code) else {
        return;
    };
    match vcpu.run().unwrap() {
        VmExit::IoOut { port, data, size } => {
            assert_eq!((port, data, size), (0x80, &[0x5a][..], 1));
        }
        other => panic!("expected an OUT exit, got {other:?}"),
    }
    match vcpu.run().unwrap() {
        VmExit::IoIn { port, data, size } => {
            assert_eq!((port, data.len(), size), (0x3f8, 1, 1));
            data[0] = 0xa7;
        }
        other => panic!("expected an IN exit, got {other:?}"),
    }
    // The value read came back into the guest, which writes it out again.
    match vcpu.run().unwrap() {
        VmExit::IoOut { port, data, .. } => assert_eq!((port, data), (0x81, &[0xa7][..])),
        other => panic!("expected an OUT exit, got {other:?}"),
    }
}

#[test]
fn string_out_reports_access_size() {
    // mov si, 0x1100; mov cx, 3; mov dx, 0x3f8; rep outsb; hlt  (data "abc" at 0x1100)
    let mut code = vec![
        0xbe, 0x00, 0x11, 0xb9, 0x03, 0x00, 0xba, 0xf8, 0x03, 0xf3, 0x6e, 0xf4,
    ];
    code.resize(0x100, 0x90);
    code.extend_from_slice(b"abc");
    let Some((_vm, mut vcpu, _mem)) = tiny_vm(&code) else {
        return;
    };
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match vcpu.run().unwrap() {
            VmExit::IoOut { port, data, size } => {
                assert_eq!((port, size), (0x3f8, 1));
                seen.extend_from_slice(data);
            }
            other => panic!("expected OUT exits, got {other:?}"),
        }
    }
    assert_eq!(seen, b"abc");
}

#[test]
fn host_info_reports_a_kind() {
    let Ok(hv) = Hypervisor::new() else {
        println!("SKIPPED: no /dev/kvm");
        return;
    };
    let report = hv.host_info().report();
    assert!(report.contains(&format!("kind: {}", hv.kind().name())));
    assert!(report.contains("cap.irqchip: yes"), "{report}");
}

#[test]
fn vcpu_and_vm_state_round_trip() {
    // mov al, 0x5a; out 0x80, al; hlt
    let code = [0xb0, 0x5a, 0xe6, 0x80, 0xf4];
    let Some((vm, mut vcpu, _mem)) = tiny_vm(&code) else {
        return;
    };
    assert!(matches!(vcpu.run().unwrap(), VmExit::IoOut { .. }));
    let hv = Hypervisor::new().unwrap();
    let msrs = hv.msr_index_list().unwrap();
    let saved = vcpu.save_state(&msrs).unwrap();
    assert!(
        saved.msrs.iter().any(|m| m.index == 0x10),
        "the TSC is saved"
    );
    let vm_state = vm.save_state().unwrap();
    let text = serde_json::to_string(&saved).unwrap();
    let back: crate::VcpuState = serde_json::from_str(&text).unwrap();

    let Some((vm2, vcpu2, _mem2)) = tiny_vm(&code) else {
        return;
    };
    vcpu2.restore_state(&back).unwrap();
    vm2.restore_state(&vm_state).unwrap();
    assert_eq!(vcpu2.regs().unwrap().rip, saved.regs.rip);
    let again = vcpu2.save_state(&msrs).unwrap();
    assert_eq!(again.regs, saved.regs);
    assert_eq!(again.sregs.cr0, saved.sregs.cr0);
    assert_eq!(again.msrs.len(), saved.msrs.len());
    let clock = vm2.save_state().unwrap().clock.clock;
    assert!(
        clock >= vm_state.clock.clock,
        "{clock} < {}",
        vm_state.clock.clock
    );
}

#[test]
fn dirty_log_reports_the_pages_the_guest_wrote() {
    // mov byte [0x3000], 1; mov byte [0x7004], 2; out 0x80, al; mov byte [0x5000], 3; out 0x80, al
    let code = [
        0xc6, 0x06, 0x00, 0x30, 0x01, 0xc6, 0x06, 0x04, 0x70, 0x02, 0xe6, 0x80, 0xc6, 0x06, 0x00,
        0x50, 0x03, 0xe6, 0x80,
    ];
    let Some((vm, mut vcpu, mem)) = tiny_vm(&code) else {
        return;
    };
    let size = 0x10000u64;
    // SAFETY: slot 0 is `mem`'s mapping of `size` bytes, made by tiny_vm and never unmapped.
    unsafe { vm.set_dirty_logging(0, 0, size, mem as u64, true) }.unwrap();
    assert!(matches!(vcpu.run().unwrap(), VmExit::IoOut { .. }));
    let log = vm.dirty_log(0, size).unwrap();
    assert_eq!(log.len(), 1);
    // Pages 3 and 7 (and page 1, the code, only if KVM counts instruction fetches: never).
    assert_eq!(log[0], (1 << 3) | (1 << 7), "{:#x}", log[0]);
    // Read and cleared: the next round has only what was written since.
    assert!(matches!(vcpu.run().unwrap(), VmExit::IoOut { .. }));
    assert_eq!(vm.dirty_log(0, size).unwrap()[0], 1 << 5);
    // SAFETY: as above.
    unsafe { vm.set_dirty_logging(0, 0, size, mem as u64, false) }.unwrap();
    assert!(vm.dirty_log(0, size).is_err(), "no log once logging is off");
}

#[test]
fn dirty_log_sees_pages_written_before_logging_started() {
    // mov byte [0x3000], 1; out 0x80, al; mov byte [0x3000], 2; out 0x80, al
    let code = [
        0xc6, 0x06, 0x00, 0x30, 0x01, 0xe6, 0x80, 0xc6, 0x06, 0x00, 0x30, 0x02, 0xe6, 0x80,
    ];
    let Some((vm, mut vcpu, mem)) = tiny_vm(&code) else {
        return;
    };
    let size = 0x10000u64;
    // Page 3 is mapped writable for the guest before logging starts.
    assert!(matches!(vcpu.run().unwrap(), VmExit::IoOut { .. }));
    // SAFETY: slot 0 is `mem`'s mapping of `size` bytes, made by tiny_vm and never unmapped.
    unsafe { vm.set_dirty_logging(0, 0, size, mem as u64, true) }.unwrap();
    assert!(matches!(vcpu.run().unwrap(), VmExit::IoOut { .. }));
    assert_eq!(vm.dirty_log(0, size).unwrap()[0], 1 << 3);
}
