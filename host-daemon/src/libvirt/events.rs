//! libvirt domain lifecycle events, through `virt::sys` (the safe `virt`
//! API has no event registration). This module is the only place that
//! calls those raw bindings.
//!
//! The daemon erases a guest's keys when libvirt reports it undefined (for
//! example `virsh undefine`) or stopped because it migrated away.

#![allow(unsafe_code)] // raw libvirt event API, each block with a SAFETY comment

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::mpsc::Sender;

use virt::connect::Connect;
use virt::sys;

use super::HvError;

/// What happened to a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lifecycle {
    /// The domain was undefined.
    Undefined(String),
    /// The domain stopped because it migrated to another host.
    MigratedAway(String),
}

/// Registers libvirt's default event loop implementation. Must run once,
/// before the first connection is opened.
pub fn init() -> Result<(), HvError> {
    virt::event::event_register_default_impl().map_err(|e| HvError::Call {
        what: "libvirt event loop".into(),
        message: e.message().to_owned(),
    })
}

/// Opens a connection to `uri`, subscribes to lifecycle events, and runs
/// the event loop on the calling thread forever (run it on its own thread).
pub fn watch(uri: &str, tx: Sender<Lifecycle>) -> Result<(), HvError> {
    let conn = Connect::open(Some(uri)).map_err(|e| HvError::Connect {
        uri: uri.to_owned(),
        message: e.message().to_owned(),
    })?;
    let opaque = Box::into_raw(Box::new(tx)) as *mut c_void;
    type Lifecycle5 = unsafe extern "C" fn(
        sys::virConnectPtr,
        sys::virDomainPtr,
        c_int,
        c_int,
        *mut c_void,
    ) -> c_int;
    type Generic3 = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);
    // SAFETY: libvirt documents that the callback for
    // VIR_DOMAIN_EVENT_ID_LIFECYCLE is registered through the generic
    // callback type (VIR_DOMAIN_EVENT_CALLBACK) and called with the
    // lifecycle signature; both are plain C function pointers of the same
    // size.
    let generic: Generic3 = unsafe { std::mem::transmute::<Lifecycle5, Generic3>(on_lifecycle) };
    // SAFETY: `conn` is a live connection; `opaque` is a leaked Box<Sender>
    // that `free_sender` reclaims when libvirt drops the registration.
    let id = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
            Some(generic),
            opaque,
            Some(free_sender),
        )
    };
    if id < 0 {
        // SAFETY: registration failed, so libvirt did not take `opaque`.
        drop(unsafe { Box::from_raw(opaque as *mut Sender<Lifecycle>) });
        return Err(HvError::Call {
            what: "subscription to libvirt domain events".into(),
            message: virt::error::Error::last_error().message().to_owned(),
        });
    }
    // A periodic no-op timer wakes the loop, so that a connection lost
    // (libvirtd restarted) is noticed within seconds and the caller can
    // subscribe again.
    let timer =
        virt::event::event_add_timeout(5000, |_, _| {}, std::ptr::null_mut()).map_err(|e| {
            HvError::Call {
                what: "libvirt event timer".into(),
                message: e.message().to_owned(),
            }
        })?;
    let result = loop {
        if let Err(e) = virt::event::event_run_default_impl() {
            break Err(HvError::Call {
                what: "libvirt event loop".into(),
                message: e.message().to_owned(),
            });
        }
        if !conn.is_alive().unwrap_or(false) {
            break Err(HvError::Connect {
                uri: uri.to_owned(),
                message: "the connection for events closed (libvirtd restarted?)".into(),
            });
        }
    };
    let _ = timer.event_remove_timeout();
    result
}

unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    let mut buf = [0 as c_char; 80];
    // SAFETY: libvirt passes a valid domain; the buffer is larger than
    // VIR_UUID_STRING_BUFLEN (37).
    if unsafe { sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) } != 0 {
        return 0;
    }
    // SAFETY: virDomainGetUUIDString wrote a NUL-terminated string.
    let uuid = unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .to_ascii_lowercase();
    let what = match (event as u32, detail as u32) {
        (sys::VIR_DOMAIN_EVENT_UNDEFINED, _) => Lifecycle::Undefined(uuid),
        (sys::VIR_DOMAIN_EVENT_STOPPED, sys::VIR_DOMAIN_EVENT_STOPPED_MIGRATED) => {
            Lifecycle::MigratedAway(uuid)
        }
        _ => return 0,
    };
    // SAFETY: `opaque` is the Box<Sender> registered in `watch`, alive until
    // `free_sender` runs.
    let tx = unsafe { &*(opaque as *const Sender<Lifecycle>) };
    let _ = tx.send(what);
    0
}

unsafe extern "C" fn free_sender(opaque: *mut c_void) {
    // SAFETY: called once by libvirt with the pointer registered in `watch`.
    drop(unsafe { Box::from_raw(opaque as *mut Sender<Lifecycle>) });
}
