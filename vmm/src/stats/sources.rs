//! Where a running node's figures come from: the same snapshot functions SIGUSR1 prints (the
//! DSM's, forwarding's, the transport's, the shadow zap's) and the vCPUs' exit counters. Every
//! one reads relaxed atomics; none takes a lock a vCPU, the DSM or the transport waits on.

use std::sync::{Arc, Weak};
use std::time::Duration;

use dsm::{Dsm, NodeId, UffdGuestPages};
use transport::Transport;

use crate::distributed::shadow_zap::ShadowZap;
use crate::platform::Platform;
use crate::stats::report::{NodeReport, Phase, VcpuReport};
use crate::vm::NodeVm;

/// A running node's parts, held weakly: the statistics thread must never keep the DSM (and
/// with it the userfaultfd registration of guest memory) or the transport alive beyond the
/// VM's teardown.
pub struct NodeSources {
    platform: Weak<Platform>,
    dsm: Option<Weak<Dsm>>,
    mesh: Option<Weak<dyn Transport>>,
    shadow_zap: Option<Weak<ShadowZap<UffdGuestPages>>>,
}

impl NodeSources {
    /// The parts of `vm`.
    pub fn of(vm: &NodeVm) -> NodeSources {
        NodeSources {
            platform: Arc::downgrade(vm.platform()),
            dsm: vm.dsm().as_ref().map(Arc::downgrade),
            mesh: vm.mesh().as_ref().map(Arc::downgrade),
            shadow_zap: vm.shadow_zap().as_ref().map(Arc::downgrade),
        }
    }

    /// The node's figures now.
    pub fn report(&self, node: NodeId, nodes: NodeId, uptime: Duration) -> NodeReport {
        let Some(platform) = self.platform.upgrade() else {
            // The VM is gone: the node is on its way out.
            return NodeReport {
                phase: Phase::Stopping,
                ..NodeReport::starting(node, nodes, uptime)
            };
        };
        let interrupts = platform.forward().vcpu_interrupts();
        let vcpus = platform
            .local_vcpus()
            .map(|v| VcpuReport {
                index: v.index,
                exits: v.exits.snapshot(),
                interrupts: interrupts.get(v.index).copied().unwrap_or_default(),
            })
            .collect();
        let phase = if platform.stop().requested() {
            Phase::Stopping
        } else {
            Phase::Running
        };
        NodeReport {
            node,
            nodes,
            phase,
            uptime,
            vcpus,
            dsm: self.dsm.as_ref().and_then(Weak::upgrade).map(|d| d.stats()),
            forward: Some(platform.forward().stats()),
            transport: self
                .mesh
                .as_ref()
                .and_then(Weak::upgrade)
                .map(|m| m.stats()),
            shadow_zap: self
                .shadow_zap
                .as_ref()
                .and_then(Weak::upgrade)
                .map(|z| z.stats()),
        }
    }
}
