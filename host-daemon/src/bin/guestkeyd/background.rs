//! The threads of `guestkeyd run` that follow libvirt.

use std::sync::Arc;

use host_daemon::libvirt::events;
use host_daemon::ops::Daemon;

/// The threads that follow libvirt: the autostart catch-up at boot, the
/// lifecycle events that erase keys, and the retry of secret removals.
pub(crate) fn spawn_background(daemon: &Arc<Daemon>, libvirt_uri: &str) {
    // Boot: libvirt autostarts guests while it initialises, possibly
    // before guestkeyd runs; their hooks then fail. Once libvirt answers,
    // start those guests here (bounded wait).
    let boot = daemon.clone();
    std::thread::spawn(move || {
        for _ in 0..120 {
            if boot.hv.ping() {
                let swept = boot.sweep_leftover_secrets();
                if swept > 0 {
                    tracing::warn!(
                        swept,
                        "libvirt secrets left by an earlier guestkeyd removed"
                    );
                }
                let n = boot.catch_up_autostart().len();
                tracing::info!(started = n, "autostart catch-up done");
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        tracing::error!("libvirt did not answer within 60 s: autostart catch-up skipped");
    });

    // Lifecycle events: keys go when libvirt undefines a guest or it
    // migrates away.
    let (tx, rx) = std::sync::mpsc::channel();
    let uri = libvirt_uri.to_owned();
    std::thread::spawn(move || {
        // libvirtd may not be up yet at boot: retry, slowly.
        loop {
            if let Err(e) = events::watch(&uri, tx.clone()) {
                tracing::warn!(error = %e, "libvirt events unavailable; retrying in 2 s");
            }
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
    });
    let events_daemon = daemon.clone();
    std::thread::spawn(move || {
        for ev in rx {
            match ev {
                events::Lifecycle::Undefined(uuid) | events::Lifecycle::MigratedAway(uuid) => {
                    events_daemon.forget_guest(&uuid);
                }
            }
        }
    });

    // Secrets whose removal failed are tried again until they are gone.
    let sweeper = daemon.clone();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(5));
            sweeper.sweep_secrets();
        }
    });
}
