//! Routing, replicas, forwarded accesses and frame checks on a fake cluster: several
//! [`Forwarder`]s joined by in-memory links, one receiver thread per node (as the transport
//! has), recording local APICs and devices. No KVM.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::interrupt::{
    ApicAddressing, DeliveryMode, DestinationMode, InterruptMessage, Shorthand, TriggerMode,
};
use proptest::prelude::*;

use super::*;

/// Frames in flight, per destination node.
struct FakeNet {
    inboxes: Vec<mpsc::Sender<(NodeId, WireFrame)>>,
    sent: Mutex<Vec<(NodeId, NodeId, WireFrame)>>,
    cut: Mutex<Vec<NodeId>>,
}

struct FakeLink {
    me: NodeId,
    net: Arc<FakeNet>,
}

impl ForwardLink for FakeLink {
    fn send(&self, to: NodeId, frame: &WireFrame) -> Result<(), String> {
        if self.net.cut.lock().unwrap().contains(&to) {
            return Err(format!("node {to} is gone"));
        }
        self.net
            .sent
            .lock()
            .unwrap()
            .push((self.me, to, frame.clone()));
        self.net.inboxes[to as usize]
            .send((self.me, frame.clone()))
            .map_err(|e| e.to_string())
    }
}

#[derive(Default)]
struct Recorder {
    accepted: Mutex<Vec<(usize, InterruptMessage)>>,
    accesses: Mutex<Vec<(usize, IoAccess)>>,
    eois: Mutex<Vec<u8>>,
}

impl LocalApics for Recorder {
    fn accept(&self, vcpu: usize, msg: &InterruptMessage) {
        self.accepted.lock().unwrap().push((vcpu, *msg));
    }
}

impl MasterDevices for Recorder {
    fn access(&self, vcpu: usize, access: &mut IoAccess) {
        if !access.write {
            // A recognisable answer: the low byte of the address, repeated.
            let b = access.address.to_le_bytes()[0];
            access.bytes_mut().fill(b);
        }
        self.accesses.lock().unwrap().push((vcpu, *access));
    }
    fn end_of_interrupt(&self, vector: u8) {
        self.eois.lock().unwrap().push(vector);
    }
}

struct Cluster {
    nodes: Vec<Arc<Forwarder>>,
    recorders: Vec<Arc<Recorder>>,
    net: Arc<FakeNet>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Cluster {
    /// `owners[v]` is the node of vCPU v; APIC ID = index; every APIC enabled with the
    /// addressing `addr(v)`.
    fn new(owners: &[NodeId], addr: impl Fn(usize) -> ApicAddressing) -> Self {
        let node_count = owners.iter().copied().max().unwrap_or(0) as usize + 1;
        let mut inboxes = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..node_count {
            let (tx, rx) = mpsc::channel();
            inboxes.push(tx);
            receivers.push(rx);
        }
        let net = Arc::new(FakeNet {
            inboxes,
            sent: Mutex::new(Vec::new()),
            cut: Mutex::new(Vec::new()),
        });
        let initial: Vec<ApicAddressing> = (0..owners.len()).map(&addr).collect();
        let mut nodes = Vec::new();
        let mut recorders = Vec::new();
        let errors = Arc::new(Mutex::new(Vec::new()));
        for (n, rx) in receivers.into_iter().enumerate() {
            let fwd = Forwarder::new(
                ForwardConfig {
                    me: NodeId::try_from(n).unwrap(),
                    master: 0,
                    vcpu_owner: owners.to_vec(),
                    initial: initial.clone(),
                },
                Arc::new(FakeLink {
                    me: NodeId::try_from(n).unwrap(),
                    net: net.clone(),
                }),
            );
            let rec = Arc::new(Recorder::default());
            fwd.attach_local(rec.clone());
            if n == 0 {
                fwd.attach_devices(rec.clone());
            }
            let receiver = fwd.clone();
            let errs = errors.clone();
            std::thread::spawn(move || {
                while let Ok((from, frame)) = rx.recv() {
                    if let Err(e) = receiver.on_frame(from, &frame) {
                        errs.lock().unwrap().push(e.to_string());
                    }
                }
            });
            nodes.push(fwd);
            recorders.push(rec);
        }
        Self {
            nodes,
            recorders,
            net,
            errors,
        }
    }

    fn frames_sent(&self) -> usize {
        self.net.sent.lock().unwrap().len()
    }

    /// Waits until every node saw `n` accepted interrupts in total (receivers are threads).
    fn settle(&self, total: usize) -> Vec<(usize, usize, InterruptMessage)> {
        for _ in 0..500 {
            let all = self.accepted();
            if all.len() >= total {
                std::thread::sleep(Duration::from_millis(5));
                return self.accepted();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.accepted()
    }

    fn accepted(&self) -> Vec<(usize, usize, InterruptMessage)> {
        let mut all = Vec::new();
        for (n, r) in self.recorders.iter().enumerate() {
            for (v, m) in r.accepted.lock().unwrap().iter() {
                all.push((n, *v, *m));
            }
        }
        all.sort_by_key(|(n, v, _)| (*n, *v));
        all
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Frames that went through the receivers were all accepted.
        if !std::thread::panicking() {
            assert!(
                self.errors.lock().unwrap().is_empty(),
                "{:?}",
                self.errors.lock().unwrap()
            );
        }
    }
}

fn enabled_physical(v: usize) -> ApicAddressing {
    ApicAddressing {
        enabled: true,
        ..ApicAddressing::power_on(u32::try_from(v).unwrap())
    }
}

fn x2apic_cluster(v: usize) -> ApicAddressing {
    // x2APIC logical ID: cluster = id >> 4 in bits 31:16, bit (id & 15).
    let id = u32::try_from(v).unwrap();
    ApicAddressing {
        apic_id: id,
        enabled: true,
        globally_enabled: true,
        x2apic: true,
        ldr: ((id >> 4) << 16) | (1 << (id & 15)),
        dfr: 0xFFFF_FFFF,
    }
}

fn msg(vector: u8, mode: DestinationMode, dest: u32, shorthand: Shorthand) -> InterruptMessage {
    InterruptMessage {
        vector,
        delivery: DeliveryMode::Fixed,
        dest_mode: mode,
        destination: dest,
        trigger: TriggerMode::Edge,
        level_assert: true,
        shorthand,
    }
}

#[test]
fn a_physical_ipi_reaches_exactly_its_remote_target() {
    let c = Cluster::new(&[0, 1, 2, 3], enabled_physical);
    let m = msg(0x40, DestinationMode::Physical, 2, Shorthand::None);
    c.nodes[0].deliver(&m, Some(0)).unwrap();
    let got = c.settle(1);
    assert_eq!(got, vec![(2, 2, m)]);
    assert_eq!(c.frames_sent(), 1);
    assert_eq!(c.nodes[2].stats().interrupts_received, 1);
}

#[test]
fn a_multicast_to_several_vcpus_of_one_node_is_one_frame() {
    // vCPUs 0,1 on node 0; 2,3,4 on node 1; 5 on node 2. Flat logical: bit v for vCPU v.
    let owners = [0, 0, 1, 1, 1, 2];
    let c = Cluster::new(&owners, |v| ApicAddressing {
        ldr: (1 << v) << 24,
        ..enabled_physical(v)
    });
    let m = msg(0x41, DestinationMode::Logical, 0b011110, Shorthand::None);
    c.nodes[0].deliver(&m, Some(0)).unwrap();
    let got = c.settle(4);
    let targets: Vec<(usize, usize)> = got.iter().map(|(n, v, _)| (*n, *v)).collect();
    assert_eq!(targets, vec![(0, 1), (1, 2), (1, 3), (1, 4)]);
    // One frame to node 1 (three targets), none to node 2.
    assert_eq!(c.frames_sent(), 1);
    // Per vCPU: the sender counts its three remote destinations (not the local one), and each
    // remote destination counts one interrupt in.
    assert_eq!(c.nodes[0].vcpu_interrupts()[0].sent, 3);
    assert_eq!(c.nodes[0].vcpu_interrupts()[1].received, 0);
    let on_node_1 = c.nodes[1].vcpu_interrupts();
    let received: Vec<u64> = on_node_1.iter().map(|v| v.received).collect();
    assert_eq!(received, vec![0, 0, 1, 1, 1, 0]);
}

#[test]
fn xapic_cluster_and_x2apic_cluster_destinations_cross_nodes() {
    // xAPIC cluster model: cluster in the high nibble, member bit in the low nibble.
    let owners = [0, 1, 0, 1];
    let c = Cluster::new(&owners, |v| ApicAddressing {
        ldr: (((u32::try_from(v).unwrap() / 2) << 4) | (1 << (v % 2))) << 24,
        dfr: 0x0FFF_FFFF,
        ..enabled_physical(v)
    });
    // Cluster 1, members 0 and 1: vCPUs 2 (node 0) and 3 (node 1).
    let m = msg(0x42, DestinationMode::Logical, 0x13, Shorthand::None);
    c.nodes[1].deliver(&m, Some(1)).unwrap();
    let got = c.settle(2);
    assert_eq!(
        got.iter().map(|(n, v, _)| (*n, *v)).collect::<Vec<_>>(),
        vec![(0, 2), (1, 3)]
    );

    let owners: Vec<NodeId> = (0..20).map(|v| v % 2).collect();
    let c = Cluster::new(&owners, x2apic_cluster);
    // Cluster 1 (vCPUs 16..20), members 16, 17 and 19.
    let m = msg(
        0x43,
        DestinationMode::Logical,
        (1 << 16) | 0b1011,
        Shorthand::None,
    );
    c.nodes[0].deliver(&m, Some(0)).unwrap();
    let got = c.settle(3);
    assert_eq!(
        got.iter().map(|(n, v, _)| (*n, *v)).collect::<Vec<_>>(),
        vec![(0, 16), (1, 17), (1, 19)]
    );
}

#[test]
fn shorthands_include_or_exclude_the_sender_across_nodes() {
    let c = Cluster::new(&[0, 1, 1, 2], enabled_physical);
    let all_but = msg(
        0x44,
        DestinationMode::Physical,
        0,
        Shorthand::AllExcludingSelf,
    );
    c.nodes[1].deliver(&all_but, Some(1)).unwrap();
    let got = c.settle(3);
    assert_eq!(
        got.iter().map(|(_, v, _)| *v).collect::<Vec<_>>(),
        vec![0, 2, 3]
    );
    // Node 1 raised it: node 0 and node 2 get one frame each, vCPU 2 is local to node 1.
    assert_eq!(c.frames_sent(), 2);

    let c = Cluster::new(&[0, 1, 1, 2], enabled_physical);
    let all = msg(
        0x45,
        DestinationMode::Physical,
        0,
        Shorthand::AllIncludingSelf,
    );
    c.nodes[2].deliver(&all, Some(3)).unwrap();
    assert_eq!(c.settle(4).len(), 4);
    let me = msg(0x46, DestinationMode::Physical, 0, Shorthand::SelfOnly);
    c.nodes[2].deliver(&me, Some(3)).unwrap();
    let got = c.settle(5);
    assert_eq!(got.iter().filter(|(_, _, m)| m.vector == 0x46).count(), 1);
}

#[test]
fn lowest_priority_is_decided_the_same_way_wherever_it_is_raised() {
    let owners = [0, 1, 2, 3];
    let mut chosen = Vec::new();
    for sender in 0..4 {
        let c = Cluster::new(&owners, enabled_physical);
        let mut m = msg(0x57, DestinationMode::Physical, 0xFF, Shorthand::None);
        m.delivery = DeliveryMode::LowestPriority;
        c.nodes[sender].deliver(&m, None).unwrap();
        let got = c.settle(1);
        assert_eq!(got.len(), 1, "exactly one receiver");
        chosen.push(got[0].1);
    }
    assert!(chosen.windows(2).all(|w| w[0] == w[1]), "{chosen:?}");
}

#[test]
fn an_ap_that_enables_its_apic_is_reachable_as_soon_as_the_update_returns() {
    // AP vCPU 1 on node 1, power-on state: software-disabled, LDR 0. It enables itself with a
    // flat logical ID, "tells the BSP through memory" (the update has returned), and the BSP
    // at once sends a logical fixed IPI: it must arrive, every time.
    for round in 0..200 {
        let c = Cluster::new(&[0, 1], |v| {
            ApicAddressing::power_on(u32::try_from(v).unwrap())
        });
        let enabled = ApicAddressing {
            enabled: true,
            ldr: 0x02 << 24,
            ..ApicAddressing::power_on(1)
        };
        c.nodes[1].update_addressing(1, enabled).unwrap();
        assert_eq!(c.nodes[0].addressing(1), Some(enabled), "round {round}");
        let m = msg(0x30, DestinationMode::Logical, 0x02, Shorthand::None);
        c.nodes[0].deliver(&m, Some(0)).unwrap();
        let got = c.settle(1);
        assert_eq!(got, vec![(1, 1, m)], "round {round}");
    }
}

#[test]
fn forwarded_accesses_reach_the_master_in_order_and_reads_come_back() {
    let c = Cluster::new(&[0, 1, 1], enabled_physical);
    for i in 0..50u64 {
        let mut w = IoAccess::write(Space::Port, 0x3f8, &[u8::try_from(i).unwrap()]).unwrap();
        c.nodes[1].forward_io(1, &mut w).unwrap();
        let mut r = IoAccess::read(Space::Mmio, 0xFEC0_0010 + i, 4).unwrap();
        c.nodes[1].forward_io(2, &mut r).unwrap();
        assert_eq!(r.bytes(), &[u8::try_from(0x10 + i).unwrap(); 4]);
    }
    let seen = c.recorders[0].accesses.lock().unwrap().clone();
    assert_eq!(seen.len(), 100);
    for (i, pair) in seen.chunks(2).enumerate() {
        assert_eq!(pair[0].0, 1);
        assert_eq!(pair[0].1.bytes(), &[u8::try_from(i).unwrap()]);
        assert_eq!(pair[1].0, 2);
        assert_eq!(pair[1].1.space, Space::Mmio);
    }
    assert_eq!(c.nodes[1].stats().io_forwarded, 100);
    assert_eq!(c.nodes[0].stats().io_served, 100);
}

#[test]
fn eois_of_remote_vcpus_reach_the_master_devices() {
    let c = Cluster::new(&[0, 1], enabled_physical);
    c.nodes[1].end_of_interrupt(0x61).unwrap();
    c.nodes[0].end_of_interrupt(0x62).unwrap();
    for _ in 0..200 {
        if c.recorders[0].eois.lock().unwrap().len() == 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut eois = c.recorders[0].eois.lock().unwrap().clone();
    eois.sort_unstable();
    assert_eq!(eois, vec![0x61, 0x62]);
    assert!(c.recorders[1].eois.lock().unwrap().is_empty());
}

#[test]
fn a_lost_master_releases_a_vcpu_waiting_for_its_answer() {
    let c = Cluster::new(&[0, 1], enabled_physical);
    // A forwarder whose master never answers (nobody reads its inbox).
    let (tx, _rx_dropped) = mpsc::channel();
    let net = Arc::new(FakeNet {
        inboxes: vec![tx, c.net.inboxes[1].clone()],
        sent: Mutex::new(Vec::new()),
        cut: Mutex::new(Vec::new()),
    });
    let lonely = Forwarder::new(
        ForwardConfig {
            me: 1,
            master: 0,
            vcpu_owner: vec![0, 1],
            initial: (0..2).map(enabled_physical).collect(),
        },
        Arc::new(FakeLink { me: 1, net }),
    );
    let t = {
        let f = lonely.clone();
        std::thread::spawn(move || {
            let mut r = IoAccess::read(Space::Port, 0x3fd, 1).unwrap();
            f.forward_io(1, &mut r)
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    let started = std::time::Instant::now();
    lonely.peer_lost(0);
    let result = t.join().unwrap();
    assert!(
        matches!(result, Err(ForwardError::Released { vcpu: 1, .. })),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn release_ends_a_wait_for_acknowledgements() {
    let c = Cluster::new(&[0, 1], enabled_physical);
    c.net.cut.lock().unwrap().clear();
    // Node 0's receiver is alive; cut node 1 -> node 0 so the update never arrives.
    c.net.cut.lock().unwrap().push(0);
    let r = c.nodes[1].update_addressing(
        1,
        ApicAddressing {
            ldr: 1 << 24,
            ..enabled_physical(1)
        },
    );
    assert!(matches!(r, Err(ForwardError::Send { to: 0, .. })), "{r:?}");
}

fn frame(kind: u16, flags: u16, id: u64, arg: u64, payload: &[u8]) -> WireFrame {
    WireFrame {
        kind,
        flags,
        id,
        arg,
        payload: payload.to_vec(),
    }
}

#[test]
fn frames_that_speak_for_someone_else_or_go_to_the_wrong_node_are_refused() {
    let c = Cluster::new(&[0, 1, 2], enabled_physical);
    let node0 = &c.nodes[0];
    let node1 = &c.nodes[1];
    let m = msg(0x50, DestinationMode::Physical, 1, Shorthand::None);
    // Node 2 claims vCPU 1 (node 1's) as the source.
    let bad_source = ForwardMessage::Interrupt {
        source: Some(1),
        msg: m,
        targets: vec![1],
    }
    .encode();
    assert!(node1.on_frame(2, &bad_source).is_err());
    // Targets a vCPU that does not run on the receiver.
    let bad_target = ForwardMessage::Interrupt {
        source: Some(2),
        msg: m,
        targets: vec![0],
    }
    .encode();
    assert!(node1.on_frame(2, &bad_target).is_err());
    // A vCPU index beyond the guest.
    let beyond = ForwardMessage::Interrupt {
        source: None,
        msg: m,
        targets: vec![7],
    }
    .encode();
    assert!(node1.on_frame(0, &beyond).is_err());
    // Addressing for a vCPU the sender does not own.
    let addr = ForwardMessage::Addressing {
        vcpu: 0,
        seq: 1,
        state: enabled_physical(0),
    }
    .encode();
    assert!(node1.on_frame(2, &addr).is_err());
    assert_eq!(node1.addressing(0), Some(enabled_physical(0)));
    // Device accesses go to the master only, for the sender's own vCPUs.
    let access = ForwardMessage::IoRequest {
        vcpu: 2,
        seq: 1,
        access: IoAccess::read(Space::Port, 0x3f8, 1).unwrap(),
    }
    .encode();
    assert!(node1.on_frame(2, &access).is_err());
    let stolen = ForwardMessage::IoRequest {
        vcpu: 1,
        seq: 1,
        access: IoAccess::read(Space::Port, 0x3f8, 1).unwrap(),
    }
    .encode();
    assert!(node0.on_frame(2, &stolen).is_err());
    // Answers come from the master only, and only to a waiting vCPU.
    let reply = ForwardMessage::IoReply {
        vcpu: 1,
        seq: 9,
        data: vec![1],
    }
    .encode();
    assert!(node1.on_frame(2, &reply).is_err());
    assert!(node1.on_frame(0, &reply).is_err());
    // An EOI to a node that is not the master.
    assert!(node1
        .on_frame(0, &ForwardMessage::Eoi { vector: 3 }.encode())
        .is_err());
    // Nothing was delivered or carried out.
    std::thread::sleep(Duration::from_millis(20));
    assert!(c.accepted().is_empty());
    assert!(c.recorders[0].accesses.lock().unwrap().is_empty());
}

#[test]
fn malformed_frames_are_refused_by_shape() {
    let bad = [
        frame(99, 0, 0, 0, &[]),
        frame(wire::kind::INTERRUPT, 0, u64::MAX, 0x2030, &[]),
        frame(wire::kind::INTERRUPT, 0, u64::MAX, 0x2330, &[1, 0, 0, 0]),
        frame(wire::kind::INTERRUPT, 0, u64::MAX, 0x2030, &[1, 0, 0]),
        frame(wire::kind::ADDRESSING, 0, 1, 1, &[0; 12]),
        frame(wire::kind::ADDRESSING, 0, 1, 1, &[0xF8; 13]),
        frame(wire::kind::IO_REQUEST, 3 << 8, 1, 0x3f8, &[0; 8]),
        frame(wire::kind::IO_REQUEST, 1 << 8, 1, 0x1_0000, &[0; 8]),
        frame(wire::kind::IO_REQUEST, (1 << 8) | 1, 1, 0x3f8, &[0; 8]),
        frame(wire::kind::IO_REPLY, 0, 1, 1, &[0; 3]),
        frame(wire::kind::EOI, 0, 256, 0, &[]),
    ];
    for f in bad {
        assert!(ForwardMessage::decode(&f).is_err(), "{f:?}");
    }
}

#[test]
fn every_message_round_trips_through_its_frame() {
    let msgs = [
        ForwardMessage::Interrupt {
            source: Some(3),
            msg: msg(0x31, DestinationMode::Logical, 0x1_0003, Shorthand::None),
            targets: vec![1, 5, 9],
        },
        ForwardMessage::Interrupt {
            source: None,
            msg: InterruptMessage::fixed(0x24, 0),
            targets: vec![0],
        },
        ForwardMessage::Addressing {
            vcpu: 2,
            seq: 77,
            state: x2apic_cluster(18),
        },
        ForwardMessage::AddressingAck { vcpu: 2, seq: 77 },
        ForwardMessage::IoRequest {
            vcpu: 1,
            seq: 5,
            access: IoAccess::write(Space::Mmio, 0xFEC0_0000, &[1, 2, 3, 4]).unwrap(),
        },
        ForwardMessage::IoRequest {
            vcpu: 1,
            seq: 6,
            access: IoAccess::read(Space::Port, 0x3fd, 1).unwrap(),
        },
        ForwardMessage::IoReply {
            vcpu: 1,
            seq: 6,
            data: vec![0x60],
        },
        ForwardMessage::Eoi { vector: 0xEF },
    ];
    for m in msgs {
        assert_eq!(ForwardMessage::decode(&m.encode()).as_ref(), Ok(&m));
    }
}

proptest! {
    #[test]
    fn decoding_any_frame_never_panics(
        kind in 0u16..8,
        flags: u16,
        id: u64,
        arg: u64,
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let _ = ForwardMessage::decode(&frame(kind, flags, id, arg, &payload));
    }
}
