//! Getting a vCPU thread out of `KVM_RUN`: a real-time signal whose handler sets the thread's
//! `kvm_run.immediate_exit`. The flag closes the race of a signal that arrives just before the
//! thread enters `KVM_RUN`: KVM then returns `EINTR` at once instead of running the guest.

use std::cell::Cell;
use std::ptr::null_mut;
use std::sync::Once;

use kvm_bindings::kvm_run;

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(null_mut()) };
}

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|p| p.get());
    if !run.is_null() {
        // SAFETY: the pointer was registered by this very thread for its own vCPU's kvm_run
        // mapping, which outlives the registration (see `register_current`); a single byte
        // store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler for the process (idempotent).
pub fn install_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with our handler and SA_SIGINFO is a valid argument; the
        // handler only touches a thread-local pointer and one byte it points to.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(kick_signal(), &sa, null_mut()) != 0 {
                result = Err(std::io::Error::last_os_error());
            }
        }
    });
    result
}

/// Registers the calling thread's `kvm_run`, so a kick sets its `immediate_exit`.
///
/// # Safety
/// `run` must stay mapped until [`unregister_current`] is called on this thread.
pub unsafe fn register_current(run: *mut kvm_run) {
    KVM_RUN.with(|p| p.set(run));
}

/// Undoes [`register_current`].
pub fn unregister_current() {
    KVM_RUN.with(|p| p.set(null_mut()));
}

/// Blocks the kick signal in the calling thread: a test hook (`SPANVM_TEST_VCPU_IGNORES_KICK`)
/// that makes a vCPU blocked in a page fault stay there through the stop, as it does on a kernel
/// whose KVM page faults a signal cannot interrupt, or in a VMM access to guest memory.
pub fn block_in_current_thread() -> std::io::Result<()> {
    // SAFETY: a zeroed sigset filled by sigemptyset/sigaddset is a valid argument, and
    // pthread_sigmask only changes the calling thread's mask.
    let rc = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Kicks `thread` (a vCPU thread) out of the guest.
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: `thread` is a live vCPU thread (the caller holds its handle until join); the
    // signal has our handler installed, so it cannot terminate the process.
    unsafe { libc::pthread_kill(thread, kick_signal()) };
}
