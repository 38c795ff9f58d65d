//! The libvirt hook's side: keys become ephemeral, private libvirt secrets
//! while QEMU opens the disks (`prepare`), and go again (`release`); and the
//! autostart catch-up after boot.

use std::collections::BTreeSet;

use virt_plugin::protocol::Disk;

use std::sync::Mutex;

use super::{Daemon, OpsError};

/// Guests the autostart catch-up starts at once.
const AUTOSTART_WORKERS: usize = 8;

impl Daemon {
    /// For the hook's `prepare`: defines the guest's volume secrets.
    /// `disks`: the encrypted disks the domain names. A disk whose key this
    /// host does not hold is refused before libvirt sees it (libvirt would
    /// only say "Secret not found"), naming the disk, and what the server
    /// knows of it: the volume, the host its key goes to, the command.
    pub fn prepare_secrets(&self, domain: &str, disks: &[Disk]) -> Result<(), OpsError> {
        let rec = self.store.load(domain)?;
        let vols = self.store.volumes()?;
        let held: BTreeSet<String> = rec
            .as_ref()
            .map(|r| r.keys.iter().map(|k| k.secret_uuid.to_string()).collect())
            .unwrap_or_default();
        for d in disks.iter().filter(|d| !held.contains(&d.secret)) {
            // A disk naming one of our volumes whose key this guest does not hold.
            if let Some(v) = vols.values().find(|v| v.secret_uuid == d.secret) {
                return Err(OpsError::Precondition(format!(
                    "this host holds no key of volume {} ({}) for domain {domain}: define the guest with `guestkeyctl guest define`",
                    v.name, v.path
                )));
            }
            // The operator's own secret, defined in libvirt: not ours.
            if self.hv.secret_defined(&d.secret)? {
                continue;
            }
            return Err(OpsError::Precondition(self.unknown_disk(d)));
        }
        let Some(rec) = rec else { return Ok(()) };
        // Keys this host keeps no copy of: released by the server now,
        // through their volumes' gates (an attestation of this host).
        let fetched = if rec.keys.iter().any(|k| k.sealed.is_empty()) {
            let lookup = self.lookup.get().ok_or_else(|| {
                OpsError::Precondition(format!(
                    "domain {domain} needs keys that this host keeps no copy of, and guestkeyd has no link to the management server to ask for them"
                ))
            })?;
            lookup.release(rec.uuid.as_str()).map_err(|e| {
                OpsError::Precondition(format!("the management server released no key: {e}"))
            })?
        } else {
            vec![]
        };
        let mut set = vec![];
        for k in rec.keys.iter() {
            self.preparing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(k.secret_uuid.to_string());
            let done = self.set_one(domain, k, &fetched);
            if let Err(e) = done {
                // None of this guest's secrets stays behind a failed
                // prepare, whatever failed.
                for s in set {
                    self.drop_secret(s);
                }
                self.drop_secret(k.secret_uuid.as_str());
                return Err(e);
            }
            set.push(k.secret_uuid.as_str());
        }
        self.prepared
            .fetch_add(set.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Defines the secret of one disk of `domain`: its stored packet, or
    /// the one the server released now (`fetched`).
    fn set_one(
        &self,
        domain: &str,
        k: &crate::store::StoredKey,
        fetched: &[super::SealedKey],
    ) -> Result<(), OpsError> {
        let (sealed, generation) = if k.sealed.is_empty() {
            let f = fetched
                .iter()
                .find(|f| f.volume == k.volume_id)
                .ok_or_else(|| {
                    OpsError::Precondition(format!(
                        "the management server released no key of volume {} for domain {domain}",
                        k.volume_id
                    ))
                })?;
            (&f.sealed[..], f.generation)
        } else {
            (&k.sealed[..], k.generation)
        };
        let packet = self.open_key(sealed, k.volume_id, generation)?;
        let done = self.hv.set_secret(
            k.secret_uuid.as_str(),
            k.path.as_str(),
            packet.secret.expose_secret(),
        );
        drop(packet);
        Ok(done?)
    }

    /// Why disk `d` cannot start here, and what to do.
    fn unknown_disk(&self, d: &Disk) -> String {
        let mut m = format!(
            "disk {} ({}) is LUKS-encrypted with libvirt secret {}, which is not defined on this host, and guestkeyd holds no key for it",
            d.target, d.source, d.secret
        );
        let known = self
            .lookup
            .get()
            .and_then(|l| l.describe(&d.source, &d.secret));
        let me = self.keys.host.as_str();
        match known {
            Some(k) if k.host != me => m.push_str(&format!(
                ": it is guestkey volume {} ({}), whose key goes to host {} only: start the guest there, or move it with `guestkeyctl guest migrate GUEST --to {me}`",
                k.volume, k.state, k.host
            )),
            Some(k) if !k.same_secret => m.push_str(&format!(
                ": it is guestkey volume {} of this host, but the disk names another secret: define the guest through guestkey (`guestkeyctl guest define --host {me} --xml FILE`), which sets the right one",
                k.volume
            )),
            Some(k) => m.push_str(&format!(
                ": it is guestkey volume {} ({}) of this host: define the guest through guestkey (`guestkeyctl guest define --host {me} --xml FILE`)",
                k.volume, k.state
            )),
            None => m.push_str(
                ": define that libvirt secret, or bring the volume under guestkey (`guestkeyctl volume encrypt` for a cleartext one) and define the guest with `guestkeyctl guest define`",
            ),
        }
        m
    }

    /// For the hook's `release`: removes the guest's volume secrets.
    pub fn release_secrets(&self, domain: &str, wanted: &BTreeSet<String>) -> Result<(), OpsError> {
        let mut all: BTreeSet<String> = wanted.clone();
        if let Some(rec) = self.store.load(domain)? {
            all.extend(rec.keys.iter().map(|k| k.secret_uuid.to_string()));
        }
        let ours: BTreeSet<String> = self
            .store
            .volumes()?
            .values()
            .map(|v| v.secret_uuid.clone())
            .collect();
        let mut left = vec![];
        for s in all.intersection(&ours) {
            if !self.drop_secret(s) {
                left.push(s.as_str());
            }
        }
        if left.is_empty() {
            Ok(())
        } else {
            Err(OpsError::Precondition(format!(
                "libvirt secret(s) {} could not be removed yet: guestkeyd keeps trying",
                left.join(", ")
            )))
        }
    }

    /// At start-up, once libvirt answers: erases the keys of stored guests
    /// that libvirt no longer knows, and starts the stored guests that
    /// libvirt marks for autostart but that do not run, because libvirt's own
    /// autostart came before guestkeyd (see docs/host-daemon.md, "Boot").
    /// Needs no management server, except for guests with a disk whose key
    /// the server releases at each start. Returns the guests started.
    pub fn catch_up_autostart(&self) -> Vec<String> {
        let mut started = vec![];
        let guests = match self.store.guests() {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "cannot list the sealed guests: autostart catch-up skipped");
                return started;
            }
        };
        let mut due = vec![];
        for uuid in guests {
            match (self.hv.domain_autostart(&uuid), self.hv.domain_state(&uuid)) {
                (Ok(Some(true)), Ok(Some(state))) if !state.holds_disks() => due.push(uuid),
                (Ok(None), _) => {
                    // Undefined while guestkeyd was not running: its keys go.
                    tracing::info!(guest = %uuid, "guest no longer defined in libvirt");
                    self.forget_guest(&uuid);
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(guest = %uuid, error = %e, "cannot read the guest's state for autostart")
                }
                _ => {}
            }
        }
        // A few workers take the guests in turn: a guest whose keys wait
        // for the server (an attestation, an operator's approval) holds up
        // one worker, not the others.
        let next = std::sync::atomic::AtomicUsize::new(0);
        let done = Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for _ in 0..AUTOSTART_WORKERS.min(due.len()) {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let Some(uuid) = due.get(i) else { break };
                        match self.hv.start_domain(uuid) {
                            Ok(_) => {
                                tracing::info!(guest = %uuid, "autostarted");
                                done.lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push(uuid.clone());
                            }
                            Err(e) => {
                                tracing::error!(guest = %uuid, error = %e, "autostart failed")
                            }
                        }
                    }
                });
            }
        });
        started.extend(done.into_inner().unwrap_or_else(|p| p.into_inner()));
        started
    }
}
