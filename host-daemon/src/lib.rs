//! guestkey host daemon (`guestkeyd`): sealed key store, libvirt secrets,
//! volumes and guests, re-encryption, lifecycle events.
//!
//! Not built yet (issue "Host daemon and libvirt plugin"): this crate holds no
//! code, and no binary is shipped, so nothing here claims to work.
