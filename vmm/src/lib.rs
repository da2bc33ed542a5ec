//! The spanvm VMM: KVM setup, guest memory, vCPU threads and their exit loop, the platform
//! wiring, probe guests, and the commands of the `spanvm` binary.

pub mod arch;
pub mod bench;
pub mod boot;
pub mod cluster;
pub mod commands;
pub mod console;
mod convert;
pub mod distributed;
pub mod hypervisor;
pub mod memory;
pub mod platform;
pub mod probe;
pub mod stats;
pub mod stop;
pub mod tsc;
pub mod vcpu;
pub mod virtio;
pub mod vm;
