//! The process's TPM thread: one per TCTI. Jobs run on it in order, each
//! bounded by a deadline, so a TCTI that never answers (a wedged resource
//! manager, a simulator that is not there) ends in an error naming the TCTI
//! instead of a daemon that hangs at start-up.

use std::collections::BTreeMap;
use std::sync::{Mutex, mpsc};
use std::time::Duration;

use crate::tpm::TpmError;
use crate::tpm::device::Tpm;

/// How long one TPM operation may take before the TCTI is declared not
/// answering. Real TPMs take up to a few seconds for a primary key.
pub const DEADLINE: Duration = Duration::from_secs(60);

type Job = Box<dyn FnOnce(Result<&mut Tpm, TpmError>) + Send>;

/// One TPM thread per TCTI in a process: jobs run in order on it. The
/// connection stays open while jobs queue and is closed when the queue is
/// empty, so other programs (a simulator serves one connection at a time)
/// get their turn.
fn service(tcti: &str) -> Result<mpsc::Sender<Job>, TpmError> {
    static SERVICES: Mutex<BTreeMap<String, mpsc::Sender<Job>>> = Mutex::new(BTreeMap::new());
    let mut all = SERVICES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(tx) = all.get(tcti) {
        return Ok(tx.clone());
    }
    let (tx, rx) = mpsc::channel::<Job>();
    let name = tcti.to_owned();
    std::thread::Builder::new()
        .name("tpm".into())
        .spawn(move || {
            while let Ok(job) = rx.recv() {
                let mut open = Tpm::open(&name);
                let mut next = Some(job);
                while let Some(job) = next.take() {
                    match &mut open {
                        Ok(t) => job(Ok(t)),
                        Err(e) => job(Err(e.again())),
                    }
                    next = rx.try_recv().ok();
                }
                // Dropping the context closes the connection.
            }
        })
        .map_err(|e| TpmError::Io(format!("cannot start the TPM thread: {e}")))?;
    all.insert(tcti.to_owned(), tx.clone());
    Ok(tx)
}

/// Runs `f` against the TPM at `tcti` on the process's TPM thread, bounded
/// by `deadline`.
pub fn with_tpm<T: Send + 'static>(
    tcti: &str,
    deadline: Duration,
    f: impl FnOnce(&mut Tpm) -> Result<T, TpmError> + Send + 'static,
) -> Result<T, TpmError> {
    let (tx, rx) = mpsc::channel();
    let job: Job = Box::new(move |tpm| {
        let _ = tx.send(tpm.and_then(f));
    });
    service(tcti)?
        .send(job)
        .map_err(|_| TpmError::Io("the TPM thread is gone".into()))?;
    rx.recv_timeout(deadline).map_err(|_| {
        TpmError::Unreachable(format!(
            "the TPM at TCTI `{tcti}` did not answer within {} s: check that the TPM (or its resource manager) is up",
            deadline.as_secs()
        ))
    })?
}
