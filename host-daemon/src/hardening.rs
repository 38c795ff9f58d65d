//! Process hardening for a process that holds keys: not dumpable (no core
//! dumps, no ptrace by non-root), core size 0, no mapping in a dump
//! (`coredump_filter` 0), and all memory locked so that no key page is ever
//! written to swap. This covers every buffer a key passes through, including
//! libvirt's client library, which per-buffer `mlock`/`MADV_DONTDUMP` would
//! not.

#![allow(unsafe_code)] // libc calls, each with a SAFETY comment

/// What could not be applied (the daemon logs it and goes on only for
/// mlockall, which needs a raised RLIMIT_MEMLOCK outside root).
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct HardeningError {
    what: &'static str,
    #[source]
    source: std::io::Error,
}

fn check(what: &'static str, rc: libc::c_int) -> Result<(), HardeningError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(HardeningError {
            what,
            source: std::io::Error::last_os_error(),
        })
    }
}

/// Makes the process non-dumpable and sets its core size limit to zero.
pub fn no_dumps() -> Result<(), HardeningError> {
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) takes no pointers.
    check("prctl(PR_SET_DUMPABLE, 0)", unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0)
    })?;
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `zero` is a valid rlimit that outlives the call.
    check("setrlimit(RLIMIT_CORE, 0)", unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &zero)
    })?;
    // No mapping of any kind in a dump, even one taken despite the above
    // (the process-wide equivalent of MADV_DONTDUMP on every key page).
    std::fs::write("/proc/self/coredump_filter", "0").map_err(|source| HardeningError {
        what: "write /proc/self/coredump_filter",
        source,
    })
}

/// Locks all current and future pages in memory.
pub fn lock_memory() -> Result<(), HardeningError> {
    // SAFETY: mlockall takes flags only.
    check("mlockall", unsafe {
        libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE)
    })
}

/// Whether the process is currently dumpable (for tests and status).
pub fn is_dumpable() -> bool {
    // SAFETY: prctl(PR_GET_DUMPABLE) takes no pointers.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) == 1 }
}
