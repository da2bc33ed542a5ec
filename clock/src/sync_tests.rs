//! The procedures against a simulated pair of hosts: one true time, each VM's kvmclock an
//! epoch away from it, each host's realtime and TSC their own offsets from it, and a link with
//! chosen one-way delays.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::*;
use crate::{ClockReading, KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME, KVM_CLOCK_TSC_STABLE};

/// True time in ns; every clock read takes `READ_NS`.
#[derive(Default)]
struct World {
    now: AtomicU64,
}

const READ_NS: u64 = 40;

/// A simulated clock or counter value as the kernel reports it; the tests keep every epoch
/// and base such that these stay inside u64, so a value outside it is a broken test.
fn clock_value(v: i128) -> u64 {
    u64::try_from(v).expect("simulated clock values stay within u64")
}

impl World {
    fn advance(&self, ns: u64) -> u64 {
        self.now.fetch_add(ns, Ordering::SeqCst) + ns
    }
    fn now(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
}

/// One host's VM: clock = true + epoch, realtime = true + realtime_base, TSC = true + tsc_base.
struct FakeVm {
    world: Arc<World>,
    epoch: Mutex<i128>,
    realtime_base: i128,
    tsc_base: i128,
    flags: u32,
    can_realtime: bool,
    fail_set: bool,
    /// What a set with realtime lands ahead by (as KVM's does).
    set_error_ns: i128,
}

impl FakeVm {
    fn new(world: &Arc<World>, epoch: i128, realtime_base: i128, tsc_base: i128) -> Self {
        Self {
            world: world.clone(),
            epoch: Mutex::new(epoch),
            realtime_base,
            tsc_base,
            flags: KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC,
            can_realtime: true,
            fail_set: false,
            set_error_ns: 0,
        }
    }
    fn clock_at(&self, t: u64) -> i128 {
        i128::from(t) + *self.epoch.lock().unwrap()
    }
    fn tsc_at(&self, t: u64) -> i128 {
        i128::from(t) + self.tsc_base
    }
}

impl VmClock for FakeVm {
    fn get(&self) -> Result<ClockReading, ClockError> {
        let t = self.world.advance(READ_NS);
        Ok(ClockReading {
            clock_ns: clock_value(self.clock_at(t)),
            flags: self.flags,
            realtime_ns: if self.flags & KVM_CLOCK_REALTIME != 0 {
                clock_value(i128::from(t) + self.realtime_base)
            } else {
                0
            },
            host_tsc: clock_value(self.tsc_at(t)),
        })
    }
    fn set(&self, clock_ns: u64, at_realtime: Option<u64>) -> Result<(), ClockError> {
        if self.fail_set {
            return Err(ClockError::Kvm {
                what: "KVM_SET_CLOCK",
                detail: "Invalid argument (os error 22)".into(),
            });
        }
        let t = self.world.advance(READ_NS);
        let passed = at_realtime.map_or(0, |r| {
            i128::from(t) + self.realtime_base - i128::from(r) + self.set_error_ns
        });
        *self.epoch.lock().unwrap() = i128::from(clock_ns) + passed - i128::from(t);
        Ok(())
    }
    fn can_set_at_realtime(&self) -> bool {
        self.can_realtime
    }
}

struct FakeTsc {
    control: TscControl,
    set: Mutex<Option<i64>>,
}

impl FakeTsc {
    fn fixed() -> Self {
        Self {
            control: TscControl::Fixed {
                reason: "kvm_pvm cannot offset the guest TSC".into(),
            },
            set: Mutex::new(None),
        }
    }
    fn offset(offset: i64) -> Self {
        Self {
            control: TscControl::Offset { offset },
            set: Mutex::new(None),
        }
    }
}

impl GuestTsc for FakeTsc {
    fn control(&self) -> TscControl {
        self.control.clone()
    }
    fn set_offset(&self, offset: i64) -> Result<(), ClockError> {
        *self.set.lock().unwrap() = Some(offset);
        Ok(())
    }
}

/// The master at the other end: (out, back) delays per exchange, cycling.
struct FakeLink<'a> {
    world: Arc<World>,
    master: &'a FakeVm,
    tsc: MasterTsc,
    delays: Vec<(u64, u64)>,
    exchanges: AtomicUsize,
    fail_at: Option<usize>,
}

impl MasterLink for FakeLink<'_> {
    fn exchange(&self, seq: u64) -> Result<ClockReply, ClockError> {
        let n = self.exchanges.fetch_add(1, Ordering::SeqCst);
        if self.fail_at == Some(n) {
            return Err(ClockError::BadFrame {
                from: 0,
                what: "clock sample reply",
                why: "bad magic".into(),
            });
        }
        let (out, back) = self.delays[n % self.delays.len()];
        self.world.advance(out);
        let reply = reply_to_ping(seq, self.master, self.tsc)?;
        self.world.advance(back);
        Ok(reply)
    }
}

const BOOT_A: &str = "7c5c600e-dd48-4777-960b-5018c5a14a37";
const BOOT_B: &str = "11111111-2222-3333-4444-555555555555";

fn boot(s: &str) -> BootId {
    BootId::parse(s).unwrap()
}

/// Varied delays; one symmetric short round trip among them.
fn noisy_delays() -> Vec<(u64, u64)> {
    vec![
        (90_000, 20_000),
        (15_000, 60_000),
        (40_000, 40_000),
        (6_000, 6_000),
        (200_000, 5_000),
        (12_000, 30_000),
    ]
}

#[test]
fn same_host_sets_the_clock_exactly_from_realtime() {
    let world = Arc::new(World::default());
    world.advance(1_000_000_000);
    // Same host: one realtime and one TSC; the master's VM was created 5 s earlier.
    let master_vm = FakeVm::new(&world, 5_000_000_000, 1 << 60, 777);
    let local_vm = FakeVm::new(&world, -1_000_000_000, 1 << 60, 777);
    let master_tsc = FakeTsc::fixed();
    let start = master_clock(boot(BOOT_A), 3_000_000, &master_vm, &master_tsc).unwrap();
    world.advance(3_000_000); // START takes 3 ms to arrive
    let link = FakeLink {
        world: world.clone(),
        master: &master_vm,
        tsc: MasterTsc::Fixed,
        delays: noisy_delays(),
        exchanges: AtomicUsize::new(0),
        fail_at: None,
    };
    let tsc = FakeTsc::fixed();
    let node = LocalNode {
        id: 1,
        boot_id: boot(BOOT_A),
        tsc_khz: 3_000_000,
        vm: &local_vm,
        tsc: &tsc,
    };
    let report = sync_with_master(&node, &start, &link, 4).unwrap();
    let t = world.now();
    // Exact up to the one read the set takes.
    assert!((local_vm.clock_at(t) - master_vm.clock_at(t)).abs() <= i128::from(READ_NS));
    assert_eq!(report.method, ClockMethod::SameHostRealtime);
    assert!(report.same_host);
    assert_eq!(report.clock_skew_bound_ns, 0);
    assert!(
        report.clock_skew_ns.abs() <= i128::from(READ_NS),
        "{report}"
    );
    // Measured with at least MIN_SAMPLES round trips although 4 were asked for.
    assert_eq!(link.exchanges.load(Ordering::SeqCst), MIN_SAMPLES);
    assert_eq!(report.tsc_skew_ticks, 0);
    assert!(matches!(report.tsc, TscOutcome::CannotOffset { .. }));
    let line = report.to_string();
    assert!(
        line.starts_with("spanvm: node 1 clock: set from master (same host, realtime), skew "),
        "{line}"
    );
    assert!(line.contains("TSC_STABLE yes (master yes)"), "{line}");
    assert!(
        line.contains("kvm_pvm cannot offset the guest TSC"),
        "{line}"
    );
    assert!(line.contains("exact, one host TSC"), "{line}");
    assert!(report.warnings().is_empty(), "{:?}", report.warnings());
}

#[test]
fn other_host_sets_the_clock_from_the_best_round_trip() {
    let world = Arc::new(World::default());
    world.advance(50_000_000_000);
    let master_vm = FakeVm::new(&world, 7_000_000_000, 1 << 60, 1 << 40);
    // Other host: its own realtime (200 ms off) and TSC.
    let local_vm = FakeVm::new(&world, -40_000_000_000, (1 << 60) + 200_000_000, 5);
    let start = master_clock(boot(BOOT_A), 3_000_000, &master_vm, &FakeTsc::fixed()).unwrap();
    world.advance(2_000_000);
    let link = FakeLink {
        world: world.clone(),
        master: &master_vm,
        tsc: MasterTsc::Fixed,
        delays: noisy_delays(),
        exchanges: AtomicUsize::new(0),
        fail_at: None,
    };
    let tsc = FakeTsc::fixed();
    let node = LocalNode {
        id: 2,
        boot_id: boot(BOOT_B),
        tsc_khz: 3_000_000,
        vm: &local_vm,
        tsc: &tsc,
    };
    let report = sync_with_master(&node, &start, &link, 16).unwrap();
    let t = world.now();
    // The best round trip (6 µs each way) was symmetric: off by no more than a few reads.
    let err = local_vm.clock_at(t) - master_vm.clock_at(t);
    assert!(err.abs() <= 4 * i128::from(READ_NS), "error {err} ns");
    assert!(!report.same_host);
    assert_eq!(
        report.method,
        ClockMethod::RoundTrip {
            samples: 16,
            best_rtt_ns: 12_000 + 2 * READ_NS
        }
    );
    assert_eq!(link.exchanges.load(Ordering::SeqCst), 32);
    assert!(report.clock_skew_bound_ns >= 6_000);
    assert!(report.clock_skew_ns.unsigned_abs() <= u128::from(report.clock_skew_bound_ns));
    // The guest TSC cannot follow: the measured skew is the host TSCs' difference.
    let true_tsc_skew = local_vm.tsc_at(t) - master_vm.tsc_at(t);
    assert!(
        (report.tsc_skew_ticks - true_tsc_skew).unsigned_abs()
            <= u128::from(report.tsc_skew_bound_ticks)
    );
    assert!(report.tsc_skew_bound_ticks > 0);
    let line = report.to_string();
    assert!(
        line.contains("other host, best of 16 round trips 12.1 µs"),
        "{line}"
    );
    assert!(line.contains("measured skew"), "{line}");
    assert!(tsc.set.lock().unwrap().is_none());
}

#[test]
fn a_host_that_can_offset_makes_the_guest_tsc_follow_the_masters() {
    let world = Arc::new(World::default());
    world.advance(10_000_000_000);
    let master_vm = FakeVm::new(&world, 0, 1 << 60, 1_000_000_000_000);
    let local_vm = FakeVm::new(&world, 0, 1 << 59, 3_000_000);
    let master_guest_offset = -999_000_000_000;
    let start = master_clock(
        boot(BOOT_A),
        2_000_000,
        &master_vm,
        &FakeTsc::offset(master_guest_offset),
    )
    .unwrap();
    assert_eq!(start.tsc, MasterTsc::Offset(master_guest_offset));
    let link = FakeLink {
        world: world.clone(),
        master: &master_vm,
        tsc: start.tsc,
        delays: vec![(10_000, 10_000), (3_000, 3_000), (50_000, 1_000)],
        exchanges: AtomicUsize::new(0),
        fail_at: None,
    };
    let tsc = FakeTsc::offset(-3_000_000);
    let node = LocalNode {
        id: 1,
        boot_id: boot(BOOT_B),
        tsc_khz: 2_000_000,
        vm: &local_vm,
        tsc: &tsc,
    };
    let report = sync_with_master(&node, &start, &link, 16).unwrap();
    let set = tsc.set.lock().unwrap().expect("the offset was set");
    assert_eq!(report.tsc, TscOutcome::Follows { offset: set });
    let t = world.now();
    let local_guest = local_vm.tsc_at(t) + i128::from(set);
    let master_guest = master_vm.tsc_at(t) + i128::from(master_guest_offset);
    assert!((local_guest - master_guest).abs() <= 2 * i128::from(READ_NS));
    assert!(report.tsc_skew_ticks.unsigned_abs() <= u128::from(report.tsc_skew_bound_ticks));
    assert!(report.to_string().contains("follows the master's (offset"));
}

#[test]
fn same_host_with_an_offsettable_tsc_copies_the_masters_offset() {
    let world = Arc::new(World::default());
    let master_vm = FakeVm::new(&world, 100, 1 << 60, 0);
    let local_vm = FakeVm::new(&world, 0, 1 << 60, 0);
    let start = master_clock(boot(BOOT_A), 2_000_000, &master_vm, &FakeTsc::offset(-55)).unwrap();
    let link = FakeLink {
        world: world.clone(),
        master: &master_vm,
        tsc: start.tsc,
        delays: vec![(1_000, 1_000)],
        exchanges: AtomicUsize::new(0),
        fail_at: None,
    };
    let tsc = FakeTsc::offset(-70);
    let node = LocalNode {
        id: 3,
        boot_id: boot(BOOT_A),
        tsc_khz: 2_000_000,
        vm: &local_vm,
        tsc: &tsc,
    };
    let report = sync_with_master(&node, &start, &link, 16).unwrap();
    assert_eq!(*tsc.set.lock().unwrap(), Some(-55));
    assert_eq!(report.tsc_skew_ticks, 0);
}

#[test]
fn without_realtime_on_one_host_it_falls_back_to_round_trips() {
    let world = Arc::new(World::default());
    let master_vm = FakeVm::new(&world, 1_000_000, 1 << 60, 0);
    let mut local_vm = FakeVm::new(&world, 0, 1 << 60, 0);
    local_vm.can_realtime = false;
    let start = master_clock(boot(BOOT_A), 2_000_000, &master_vm, &FakeTsc::fixed()).unwrap();
    let link = FakeLink {
        world: world.clone(),
        master: &master_vm,
        tsc: MasterTsc::Fixed,
        delays: vec![(2_000, 2_000)],
        exchanges: AtomicUsize::new(0),
        fail_at: None,
    };
    let tsc = FakeTsc::fixed();
    let node = LocalNode {
        id: 1,
        boot_id: boot(BOOT_A),
        tsc_khz: 2_000_000,
        vm: &local_vm,
        tsc: &tsc,
    };
    let report = sync_with_master(&node, &start, &link, 16).unwrap();
    assert!(matches!(
        report.method,
        ClockMethod::RoundTrip { samples: 16, .. }
    ));
    let t = world.now();
    assert!((local_vm.clock_at(t) - master_vm.clock_at(t)).abs() <= 2 * i128::from(READ_NS));
}

#[test]
fn errors_reach_the_caller() {
    let world = Arc::new(World::default());
    let master_vm = FakeVm::new(&world, 0, 0, 0);
    let local_vm = FakeVm::new(&world, 0, 0, 0);
    let start = master_clock(boot(BOOT_A), 1_000_000, &master_vm, &FakeTsc::fixed()).unwrap();
    let link = FakeLink {
        world: world.clone(),
        master: &master_vm,
        tsc: MasterTsc::Fixed,
        delays: vec![(1_000, 1_000)],
        exchanges: AtomicUsize::new(0),
        fail_at: Some(3),
    };
    let tsc = FakeTsc::fixed();
    let node = LocalNode {
        id: 1,
        boot_id: boot(BOOT_B),
        tsc_khz: 1_000_000,
        vm: &local_vm,
        tsc: &tsc,
    };
    let e = sync_with_master(&node, &start, &link, 16).unwrap_err();
    assert!(
        e.to_string()
            .contains("node 0 sent a malformed clock sample reply"),
        "{e}"
    );

    let mut failing = FakeVm::new(&world, 0, 0, 0);
    failing.fail_set = true;
    let node = LocalNode {
        vm: &failing,
        ..node
    };
    let link = FakeLink {
        fail_at: None,
        exchanges: AtomicUsize::new(0),
        ..link
    };
    let e = sync_with_master(&node, &start, &link, 16).unwrap_err();
    assert!(e.to_string().contains("KVM KVM_SET_CLOCK failed"), "{e}");
}

#[test]
fn a_missing_tsc_stable_flag_is_reported_loudly() {
    let world = Arc::new(World::default());
    let mut master_vm = FakeVm::new(&world, 0, 1 << 60, 0);
    master_vm.flags &= !KVM_CLOCK_TSC_STABLE;
    let mut local_vm = FakeVm::new(&world, 0, 1 << 60, 0);
    local_vm.flags &= !KVM_CLOCK_TSC_STABLE;
    let start = master_clock(boot(BOOT_A), 1_000_000, &master_vm, &FakeTsc::fixed()).unwrap();
    let line = master_report(0, 3, &start, &FakeTsc::fixed().control());
    assert!(line.contains("TSC_STABLE not yet"), "{line}");
    assert!(line.contains("reference for 2 other nodes"), "{line}");
    let later = master_tsc_stable_check(0, &master_vm, std::time::Duration::ZERO).unwrap();
    assert!(later.contains("WARNING: node 0"), "{later}");
    assert!(later.contains("hv_clock_boot"), "{later}");
    let link = FakeLink {
        world: world.clone(),
        master: &master_vm,
        tsc: MasterTsc::Fixed,
        delays: vec![(1_000, 1_000)],
        exchanges: AtomicUsize::new(0),
        fail_at: None,
    };
    let tsc = FakeTsc::fixed();
    let node = LocalNode {
        id: 1,
        boot_id: boot(BOOT_A),
        tsc_khz: 2_000_000,
        vm: &local_vm,
        tsc: &tsc,
    };
    let report = sync_with_master(&node, &start, &link, 16).unwrap();
    assert!(report.to_string().contains("TSC_STABLE NO (master NO)"));
    let w = report.warnings();
    assert!(
        w.iter()
            .any(|w| w.contains("node 1") && w.contains("KVM_CLOCK_TSC_STABLE")),
        "{w:?}"
    );
    assert!(
        w.iter()
            .any(|w| w.contains("2000000 kHz, the master's at 1000000 kHz")),
        "{w:?}"
    );
}

#[test]
fn the_master_line_says_whether_others_can_follow_its_tsc() {
    let world = Arc::new(World::default());
    let vm = FakeVm::new(&world, 0, 0, 0);
    let start = master_clock(boot(BOOT_A), 1_000_000, &vm, &FakeTsc::offset(-5)).unwrap();
    let line = master_report(0, 2, &start, &TscControl::Offset { offset: -5 });
    assert!(
        line.starts_with("spanvm: node 0 clock: master, the reference for 1 other node ("),
        "{line}"
    );
    assert!(line.contains("follow this node's (offset -5"), "{line}");
    assert!(line.contains("TSC_STABLE yes;"), "{line}");
    let later = master_tsc_stable_check(0, &vm, std::time::Duration::from_secs(5)).unwrap();
    assert_eq!(
        later,
        "spanvm: node 0 clock: TSC_STABLE yes (reported once its vCPUs ran)"
    );
    let line = master_report(0, 2, &start, &FakeTsc::fixed().control());
    assert!(
        line.contains("kvm_pvm cannot offset the guest TSC, so the other nodes cannot follow"),
        "{line}"
    );
}

#[test]
fn same_host_without_realtime_in_start_sets_exactly_from_a_sample() {
    // The master's KVM had no stable master clock yet when START went out (no realtime in
    // it); its later readings have one.
    let world = Arc::new(World::default());
    world.advance(1_000_000);
    let master_vm = FakeVm::new(&world, 9_000_000_000, 1 << 60, 0);
    let local_vm = FakeVm::new(&world, 0, 1 << 60, 0);
    let mut start = master_clock(boot(BOOT_A), 1_000_000, &master_vm, &FakeTsc::fixed()).unwrap();
    start.reading.flags &= !(KVM_CLOCK_REALTIME | KVM_CLOCK_TSC_STABLE);
    let link = FakeLink {
        world: world.clone(),
        master: &master_vm,
        tsc: MasterTsc::Fixed,
        delays: vec![(70_000, 1_000), (2_000, 50_000)],
        exchanges: AtomicUsize::new(0),
        fail_at: None,
    };
    let tsc = FakeTsc::fixed();
    let node = LocalNode {
        id: 1,
        boot_id: boot(BOOT_A),
        tsc_khz: 1_000_000,
        vm: &local_vm,
        tsc: &tsc,
    };
    let report = sync_with_master(&node, &start, &link, 16).unwrap();
    assert_eq!(report.method, ClockMethod::SameHostRealtime);
    assert_eq!(link.exchanges.load(Ordering::SeqCst), 32);
    let t = world.now();
    // Exact despite round trips of 50 µs and more, very asymmetric.
    assert!((local_vm.clock_at(t) - master_vm.clock_at(t)).abs() <= i128::from(READ_NS));
    assert!(report.clock_skew_ns.abs() <= i128::from(READ_NS));
    // The master's replies say TSC_STABLE although START did not.
    assert!(report.master_tsc_stable);
}

#[test]
fn a_constant_error_of_the_exact_set_is_corrected_once() {
    let world = Arc::new(World::default());
    let master_vm = FakeVm::new(&world, 3_000_000_000, 1 << 60, 0);
    let mut local_vm = FakeVm::new(&world, 0, 1 << 60, 0);
    local_vm.set_error_ns = 450;
    let start = master_clock(boot(BOOT_A), 1_000_000, &master_vm, &FakeTsc::fixed()).unwrap();
    let link = FakeLink {
        world: world.clone(),
        master: &master_vm,
        tsc: MasterTsc::Fixed,
        delays: vec![(5_000, 5_000)],
        exchanges: AtomicUsize::new(0),
        fail_at: None,
    };
    let tsc = FakeTsc::fixed();
    let node = LocalNode {
        id: 1,
        boot_id: boot(BOOT_A),
        tsc_khz: 1_000_000,
        vm: &local_vm,
        tsc: &tsc,
    };
    let report = sync_with_master(&node, &start, &link, 16).unwrap();
    assert!(report.refined);
    assert_eq!(link.exchanges.load(Ordering::SeqCst), 32);
    assert!(
        report.clock_skew_ns.abs() <= 2 * i128::from(READ_NS),
        "{report}"
    );
    let t = world.now();
    assert!((local_vm.clock_at(t) - master_vm.clock_at(t)).abs() <= 2 * i128::from(READ_NS));
    assert!(report
        .to_string()
        .contains("(same host, realtime, corrected once)"));
}
