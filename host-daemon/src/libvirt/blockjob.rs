//! libvirt block copy, through `virt::sys` (the safe `virt` API has no
//! block-job calls). Wrapped once here: copy to a new image, follow the job,
//! pivot.

#![allow(unsafe_code)] // raw libvirt calls, each with a SAFETY comment

use std::ffi::CString;
use std::time::{Duration, Instant};

use virt::domain::Domain;
use virt::sys;

use super::HvError;

fn cstr(s: &str) -> Result<CString, HvError> {
    CString::new(s).map_err(|_| HvError::Nul(s.to_owned()))
}

fn last_error(what: &str) -> HvError {
    HvError::Call {
        what: what.to_owned(),
        message: virt::error::Error::last_error().message().to_owned(),
    }
}

/// Starts copying `disk` of the running `dom` into the existing image that
/// `dest_xml` describes (REUSE_EXT), as a transient job (required for
/// persistent domains), at most `bandwidth` bytes/s (0: no limit).
pub fn start_copy(dom: &Domain, disk: &str, dest_xml: &str, bandwidth: u64) -> Result<(), HvError> {
    let disk_c = cstr(disk)?;
    let xml_c = cstr(dest_xml)?;
    let flags = sys::VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | sys::VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB;
    let mut params: sys::virTypedParameterPtr = std::ptr::null_mut();
    let (mut n, mut max) = (0, 0);
    if bandwidth > 0 {
        // SAFETY: libvirt allocates the array and fills in one parameter;
        // the pointers are valid locals and the name a static C string.
        let rc = unsafe {
            sys::virTypedParamsAddULLong(
                &mut params,
                &mut n,
                &mut max,
                sys::VIR_DOMAIN_BLOCK_COPY_BANDWIDTH.as_ptr(),
                bandwidth,
            )
        };
        if rc < 0 {
            return Err(last_error("bandwidth of the block copy"));
        }
    }
    // SAFETY: `dom` is a live domain handle; both strings are NUL-terminated
    // and outlive the call; `params` holds `n` parameters made by libvirt
    // (or is null with n = 0).
    let rc = unsafe {
        sys::virDomainBlockCopy(
            dom.as_ptr(),
            disk_c.as_ptr(),
            xml_c.as_ptr(),
            params,
            n,
            flags,
        )
    };
    if !params.is_null() {
        // SAFETY: made by virTypedParamsAddULLong above, freed once.
        unsafe { sys::virTypedParamsFree(params, n) };
    }
    if rc < 0 {
        Err(last_error(&format!("block copy of {disk}")))
    } else {
        Ok(())
    }
}

/// (cur, end) of the block job on `disk`, or None when there is none.
pub fn progress(dom: &Domain, disk: &str) -> Result<Option<(u64, u64)>, HvError> {
    let disk_c = cstr(disk)?;
    let mut info = sys::virDomainBlockJobInfo {
        type_: 0,
        bandwidth: 0,
        cur: 0,
        end: 0,
    };
    // SAFETY: `info` is a valid, writable struct for the duration of the call.
    let rc = unsafe { sys::virDomainGetBlockJobInfo(dom.as_ptr(), disk_c.as_ptr(), &mut info, 0) };
    match rc {
        r if r < 0 => Err(last_error(&format!("block job of {disk}"))),
        0 => Ok(None),
        _ => Ok(Some((info.cur, info.end))),
    }
}

/// Switches `disk` to the copy once the job is ready.
pub fn pivot(dom: &Domain, disk: &str) -> Result<(), HvError> {
    let disk_c = cstr(disk)?;
    // SAFETY: live domain handle and NUL-terminated disk name.
    let rc = unsafe {
        sys::virDomainBlockJobAbort(
            dom.as_ptr(),
            disk_c.as_ptr(),
            sys::VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT,
        )
    };
    if rc < 0 {
        Err(last_error(&format!("pivot of {disk}")))
    } else {
        Ok(())
    }
}

/// Cancels the copy (the guest keeps its current image).
pub fn cancel(dom: &Domain, disk: &str) {
    if let Ok(disk_c) = cstr(disk) {
        // SAFETY: live domain handle and NUL-terminated disk name.
        let _ = unsafe { sys::virDomainBlockJobAbort(dom.as_ptr(), disk_c.as_ptr(), 0) };
    }
}

/// Copies and pivots, waiting at most `limit` for the copy to be ready;
/// `shown` follows the copy (bytes done, bytes in all).
pub fn copy_and_pivot(
    dom: &Domain,
    disk: &str,
    dest_xml: &str,
    limit: Duration,
    bandwidth: u64,
    shown: &dyn Fn(u64, u64),
) -> Result<(), HvError> {
    let t0 = Instant::now();
    start_copy(dom, disk, dest_xml, bandwidth)?;
    let deadline = Instant::now() + limit;
    loop {
        match progress(dom, disk) {
            Ok(Some((cur, end))) if end > 0 && cur == end => {
                shown(cur, end);
                break;
            }
            Ok(Some((cur, end))) => shown(cur, end),
            Ok(None) => {
                return Err(HvError::BlockJob(format!(
                    "the block copy of {disk} ended before it was ready"
                )));
            }
            Err(e) => {
                cancel(dom, disk);
                return Err(e);
            }
        }
        if Instant::now() > deadline {
            cancel(dom, disk);
            return Err(HvError::BlockJob(format!(
                "the block copy of {disk} was not ready within {} s",
                limit.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let ready = t0.elapsed();
    if let Err(e) = pivot(dom, disk) {
        cancel(dom, disk);
        return Err(e);
    }
    // The job disappears once the pivot completed.
    for _ in 0..600 {
        if matches!(progress(dom, disk), Ok(None)) {
            tracing::debug!(
                %disk,
                ready_ms = ready.as_millis() as u64,
                pivoted_ms = (t0.elapsed() - ready).as_millis() as u64,
                "block copy ready and pivoted"
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(HvError::BlockJob(format!(
        "the pivot of {disk} did not finish within 30 s"
    )))
}
