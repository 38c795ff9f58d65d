//! guestkey host daemon (`guestkeyd`).
//!
//! Serves the host-agent API to the management server over mutual TLS
//! ([`agent`]), keeps each guest's domain XML and sealed key packets in the
//! [`store`], talks to libvirt through the [`hypervisor::Hypervisor`] trait,
//! and answers the libvirt hook (`guestkey-hook`) on a root-only Unix
//! socket ([`hook_server`]): keys become ephemeral, private libvirt secrets
//! only while QEMU opens the disks.

pub mod agent;
pub mod blockjob;
pub mod enroll;
pub mod events;
pub mod hardening;
pub mod hook_server;
pub mod hypervisor;
pub mod keys;
pub mod luks;
pub mod progress;
pub mod reencrypt;
pub mod report;
pub mod state;
pub mod store;
