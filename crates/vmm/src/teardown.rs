//! Ending the process without waiting for KVM to tear the VM down.
//!
//! Closing a VM's last file descriptor destroys it in the kernel, and with the in-kernel
//! irqchip that costs 14-23 ms on our hosts (each in-kernel PIC/IOAPIC/PIT device leaves the
//! VM's I/O buses through an SRCU grace period; measured with a C program: 0.2 ms without the
//! irqchip, 14-23 ms with it). A supervisor waiting for the VMM to exit should not wait for that.
//! So the last step hands the teardown to a reaper: a child that shares our memory
//! (`CLONE_VM`, so creating it copies no page tables) and holds a copy of our file table. It
//! closes its standard streams (so readers of our output see EOF with our exit), waits on a
//! pipe until we are gone, and exits, dropping the last references to the VM. The VMM process
//! itself exits immediately; the reaper finishes the kernel's work in the background and is
//! reaped by init.

use std::io::Write;

/// Stack for the reaper: it only calls close(2) and read(2), then exits.
const REAPER_STACK: usize = 16 * 1024;

/// The pipe whose write end only the exiting VMM holds: EOF on it means the VMM is gone.
static mut PIPE: [libc::c_int; 2] = [-1, -1];

extern "C" fn reaper(_: *mut libc::c_void) -> libc::c_int {
    // SAFETY: PIPE was written before clone() and is never written again.
    let [rd, wr] = unsafe { PIPE };
    for fd in [0, 1, 2, wr] {
        // SAFETY: closing descriptors of the reaper's own copy of the file table.
        unsafe { libc::close(fd) };
    }
    let mut byte = 0u8;
    // SAFETY: reads at most one byte into a live local; returns 0 (EOF) once the VMM, the only
    // holder of the write end, has exited.
    while unsafe { libc::read(rd, (&mut byte as *mut u8).cast(), 1) } < 0 {}
    0
}

/// Flushes output and ends the process with `code`, leaving VM teardown to a reaper.
pub fn exit(code: i32) -> ! {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == 0 {
        // SAFETY: single-threaded use: the reaper does not exist yet.
        unsafe { PIPE = fds };
        // The stack must outlive this function: the process is ending, so leak it.
        let stack: &'static mut [u8] = Box::leak(vec![0u8; REAPER_STACK].into_boxed_slice());
        // `stack` is writable memory that is never freed; its top is 16-byte aligned as the
        // x86_64 ABI wants (the allocation is aligned, REAPER_STACK a multiple of 16). Without
        // CLONE_THREAD and with exit signal 0, the child is a separate process that nobody but
        // init waits for. If clone fails, the teardown simply happens in our own exit.
        // SAFETY: by the above, and `reaper` touches only its stack and PIPE.
        unsafe {
            let top = stack.as_mut_ptr().add(REAPER_STACK).cast::<libc::c_void>();
            libc::clone(reaper, top, libc::CLONE_VM, std::ptr::null_mut());
        }
    }
    std::process::exit(code)
}
