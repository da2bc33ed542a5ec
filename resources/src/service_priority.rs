//! How the threads that serve remote faults are scheduled on the host (`service_priority` in a
//! node file or a cluster description).
//!
//! A remote fault waits for a thread on each node it crosses: the requester's fault thread, the
//! receivers of the home and of the owner, the requester's receiver again. While the guest's
//! vCPU threads keep every core busy (a CPU-bound guest), the host's fair scheduler lets a
//! woken receiver run only when the vCPU on its core reaches the end of its time slice: on the
//! 2-core development host a quarter of the faults of a page two nodes write took 1-8 ms instead
//! of about 100 µs. At real-time priority (`SCHED_FIFO` 1, the lowest) the receiver preempts
//! the vCPU at once; it runs for microseconds and blocks again, so the vCPUs lose nothing
//! measurable. The transport's receivers and the DSM's fault thread both apply it, which is
//! why it lives in the crate both depend on.

use std::sync::Once;

use crate::ConfigWord;

/// The host scheduling of the fault-service threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServicePriority {
    /// `SCHED_FIFO` at priority 1 when the process may (root, `CAP_SYS_NICE` or an
    /// `RLIMIT_RTPRIO` of at least 1); normal scheduling, said once, when it may not.
    #[default]
    Realtime,
    /// The host's normal scheduling: for a host shared with real-time work of its own.
    Normal,
}

impl ConfigWord for ServicePriority {
    const ALL: &'static [ServicePriority] = &[ServicePriority::Realtime, ServicePriority::Normal];

    fn as_str(self) -> &'static str {
        match self {
            ServicePriority::Realtime => "realtime",
            ServicePriority::Normal => "normal",
        }
    }
}

impl ServicePriority {
    /// Applies the choice to the calling thread. With [`ServicePriority::Realtime`] and no
    /// permission the thread keeps normal scheduling and the first refusal of the process is
    /// printed (naming `who`), so that a slow cluster says why.
    pub fn apply_to_current_thread(self, who: &str) {
        if self == ServicePriority::Normal {
            return;
        }
        if let Err(error) = raise_current_thread() {
            static SAID: Once = Once::new();
            SAID.call_once(|| {
                eprintln!(
                    "spanvm: {who}: fault-service threads keep normal priority ({error}; \
                     SCHED_FIFO needs root, CAP_SYS_NICE or `ulimit -r 1`): remote faults may \
                     wait for a host time slice while vCPUs keep the cores busy \
                     (service_priority = \"normal\" silences this)"
                );
            });
        }
    }
}

impl std::fmt::Display for ServicePriority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Puts the calling thread in `SCHED_FIFO` at the lowest real-time priority. Threads it starts
/// later (a forwarding worker started on a receiver's first frame, say) get normal scheduling
/// back (`SCHED_RESET_ON_FORK`): only the threads that asked are raised.
fn raise_current_thread() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: `param` is a valid, initialised sched_param that outlives the call; pid 0 names
    // the calling thread, so no other thread's scheduling changes.
    let rc = unsafe {
        libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's scheduling policy (`SCHED_*`, without `SCHED_RESET_ON_FORK`).
    fn current_thread_policy() -> i32 {
        // SAFETY: sched_getscheduler reads the calling thread's policy (pid 0) and takes no
        // pointers.
        unsafe { libc::sched_getscheduler(0) & !libc::SCHED_RESET_ON_FORK }
    }

    #[test]
    fn spellings_round_trip_and_unknown_ones_are_refused() {
        for &p in ServicePriority::ALL {
            assert_eq!(ServicePriority::from_config(p.as_str()), Some(p));
        }
        assert_eq!(ServicePriority::from_config("fifo"), None);
        assert_eq!(ServicePriority::choices(), "\"realtime\" or \"normal\"");
        assert_eq!(ServicePriority::default(), ServicePriority::Realtime);
    }

    #[test]
    fn realtime_moves_only_the_calling_thread_to_fifo() {
        let policy = std::thread::spawn(|| {
            ServicePriority::Realtime.apply_to_current_thread("test");
            let child = std::thread::spawn(current_thread_policy)
                .join()
                .expect("a thread started by the raised one");
            (current_thread_policy(), child)
        })
        .join()
        .expect("the raised thread");
        // Root (as the test host runs) may raise; elsewhere the thread stays where it was.
        let (policy, child) = policy;
        assert_eq!(
            policy == libc::SCHED_FIFO,
            raise_allowed(),
            "policy {policy}"
        );
        assert_eq!(child, libc::SCHED_OTHER, "a thread the raised one started");
        assert_ne!(
            current_thread_policy(),
            libc::SCHED_FIFO,
            "the test's own thread moved"
        );
    }

    #[test]
    fn normal_leaves_the_thread_alone() {
        let policy = std::thread::spawn(|| {
            ServicePriority::Normal.apply_to_current_thread("test");
            current_thread_policy()
        })
        .join()
        .expect("the thread");
        assert_eq!(policy, libc::SCHED_OTHER);
    }

    /// Whether this process may use SCHED_FIFO: root or an RLIMIT_RTPRIO of at least 1.
    fn raise_allowed() -> bool {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into `limit`, which is valid for writes.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_RTPRIO, &mut limit) };
        // SAFETY: geteuid takes no arguments and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        root || (rc == 0 && limit.rlim_cur >= 1)
    }
}
