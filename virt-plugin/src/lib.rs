//! guestkey libvirt plugin (`guestkey-hook`): the qemu hook that asks the host
//! daemon for just-in-time secrets and refuses a start without a key.
//!
//! Not built yet (issue "Host daemon and libvirt plugin"): this crate holds no
//! code, and no binary is shipped, so nothing here claims to work.
