//! Hosts: registration with a one-time token, enrollment (the CA signs the
//! host's CSR), revocation, authorisation of callers by certificate hash,
//! inventory and progress reports, and where migrations to a host go.

use base64::Engine as _;
use sha2::{Digest, Sha256};
use xdr_wipe::seal::HostPublicKey;

use crate::domain::attest::{self, Credential, TpmIdentity};
use crate::domain::{Core, now_unix};
use crate::model::names::{InvalidInput, parse_address, parse_libvirt_uri, parse_migration_uri};
use crate::model::{Caller, CoreError, EnrolledHost, HostInfo, HostState, HostTpm, Name, Progress};
pub use crate::store::HeldKey;
use crate::store::{Enrollment, NewHost, Tx};

/// How long an enrollment token stays valid.
pub const TOKEN_TTL_SECS: i64 = 24 * 3600;

/// Longest progress report kept per host (volumes).
const MAX_PROGRESS: usize = 4096;

/// One entry of a host's progress report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressReport {
    /// The volume.
    pub volume_id: String,
    /// e.g. "re-encrypting".
    pub phase: String,
    /// Bytes done.
    pub done_bytes: u64,
    /// Bytes in all (0: not known).
    pub total_bytes: u64,
}

fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(format!("guestkey enrollment token v1:{token}")).to_vec()
}

fn no_such_host(name: &str) -> CoreError {
    CoreError::NotFound(format!(
        "no host named {name:?}: see `guestkeyctl host list`"
    ))
}

/// An enrolled host's details for pushing, or why keys may not go to it
/// (inside the caller's transaction, so the answer holds until it commits).
pub(crate) fn enrolled_in(tx: &mut dyn Tx, name: &str) -> Result<EnrolledHost, CoreError> {
    let h = tx.host_record(name)?.ok_or_else(|| no_such_host(name))?;
    match (h.state, h.sealing_key, h.cert_sha256) {
        (HostState::Enrolled, Some(k), Some(cert_sha256)) => Ok(EnrolledHost {
            name: h.name,
            address: h.address,
            sealing_key: HostPublicKey::from_bytes(&k)
                .map_err(|e| CoreError::Internal(e.to_string()))?,
            cert_sha256,
        }),
        (HostState::PendingEnrollment, ..) => Err(CoreError::FailedPrecondition(format!(
            "host {name} has not enrolled yet: run `guestkeyd enroll` on it with its token"
        ))),
        (HostState::Enrolled, ..) => Err(CoreError::Internal(format!(
            "host {name} is enrolled without a sealing key or certificate: the database was altered"
        ))),
        (state, ..) => Err(CoreError::FailedPrecondition(format!(
            "host {name} is {state}: no keys go to it"
        ))),
    }
}

/// Names every guestkey server certificate or admin certificate may carry,
/// whatever the server's own names are.
pub const RESERVED_NAMES: [&str; 3] = ["guestkey-server", "guestkey-admin", "localhost"];

impl Core {
    /// The server name (or reserved name) equal to `name`, ignoring case.
    fn server_name_like(&self, name: &str) -> Option<&str> {
        self.server_names
            .iter()
            .map(String::as_str)
            .chain(RESERVED_NAMES)
            .find(|s| s.eq_ignore_ascii_case(name))
    }

    /// Refuses a host name, or an address whose host part is a DNS name,
    /// that is one of the server's names: a host's certificate carries its
    /// name and address, and none may name the server. (Hosts and the
    /// server have different CAs, so such a certificate could not pass as
    /// the server anyway; the name would still mislead.) IP addresses are
    /// not compared: hosts may share the server's machine.
    fn refuse_server_names(&self, name: &Name, address: &str) -> Result<(), CoreError> {
        if let Some(s) = self.server_name_like(name.as_str()) {
            return Err(CoreError::Invalid(InvalidInput {
                what: "host name",
                value: name.to_string(),
                why: format!(
                    "it is one of the management server's names ({s}): a host's certificate carries its name, and must not name the server; pick another name"
                ),
            }));
        }
        let host = crate::tls::tls_name(address).unwrap_or_default();
        if host.parse::<std::net::IpAddr>().is_err() {
            if let Some(s) = self.server_name_like(&host) {
                return Err(CoreError::Invalid(InvalidInput {
                    what: "address",
                    value: address.to_owned(),
                    why: format!(
                        "its host part {host} is one of the management server's names ({s}): a host's certificate carries it, and must not name the server; give the host's own DNS name or IP address"
                    ),
                }));
            }
        }
        Ok(())
    }

    /// Who holds the certificate with this SHA-256, if anyone may call.
    pub fn identify(&self, cert_sha256: &str) -> Result<Option<Caller>, CoreError> {
        self.read(|tx| {
            if let Some(name) = tx.admin_by_cert(cert_sha256)? {
                return Ok(Some(Caller::Admin(name)));
            }
            Ok(tx.enrolled_host_by_cert(cert_sha256)?.map(Caller::Host))
        })
    }

    /// Registers a host; returns it, a one-time enrollment token and when
    /// the token expires.
    pub fn add_host(
        &self,
        caller: &Caller,
        name: &str,
        address: &str,
    ) -> Result<(HostInfo, String, i64), CoreError> {
        let name = Name::parse("host name", name)?;
        let address = parse_address(address)?;
        self.refuse_server_names(&name, &address)?;
        let mut raw = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::fill(raw.as_mut())
            .map_err(|_| CoreError::Internal("the OS random number generator failed".into()))?;
        let token = format!(
            "gkt_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw.as_slice())
        );
        let now = now_unix();
        let expires = now + TOKEN_TTL_SECS;
        let host = self.write(|tx| {
            if tx.host_exists(name.as_str())? {
                return Err(CoreError::AlreadyExists(format!(
                    "host {name} already exists: pick another name, or `guestkeyctl host show {name}`"
                )));
            }
            tx.insert_host(&NewHost {
                name: name.to_string(),
                address: address.clone(),
                token_hash: hash_token(&token),
                token_expires: expires,
                created: now,
            })?;
            self.log(tx,
                &caller.actor(),
                "host.added",
                name.as_str(),
                &format!("address {address}"),
            )?;
            tx.host(name.as_str())?.ok_or_else(|| no_such_host(name.as_str()))
        })?;
        Ok((host, token, expires))
    }

    /// All hosts, by name.
    pub fn list_hosts(&self) -> Result<Vec<HostInfo>, CoreError> {
        self.read(|tx| {
            let mut hosts = tx.hosts()?;
            for h in &mut hosts {
                h.attestation = self.host_attestation(tx, &h.name)?;
            }
            Ok(hosts)
        })
    }

    /// One host.
    pub fn get_host(&self, name: &str) -> Result<HostInfo, CoreError> {
        self.read(|tx| {
            let mut h = tx.host(name)?.ok_or_else(|| no_such_host(name))?;
            h.attestation = self.host_attestation(tx, name)?;
            Ok(h)
        })
    }

    /// Revokes a host: its certificate no longer authenticates, no key is
    /// released to it, and its pending operations stop.
    pub fn revoke_host(&self, caller: &Caller, name: &str) -> Result<HostInfo, CoreError> {
        self.write(|tx| {
            if !tx.revoke_host(name)? {
                let h = tx.host(name)?.ok_or_else(|| no_such_host(name))?;
                return Err(CoreError::FailedPrecondition(format!(
                    "host {} is already revoked",
                    h.name
                )));
            }
            self.log(tx, &caller.actor(), "host.revoked", name, "")?;
            tx.host(name)?.ok_or_else(|| no_such_host(name))
        })
    }

    /// Enrolls a host with its one-time token: signs its CSR and records its
    /// certificate and packet-sealing key. Returns the host name and
    /// certificate (PEM). Every refusal is audited and changes nothing else.
    pub fn enroll(
        &self,
        token: &str,
        csr_der: &[u8],
        sealing_key: &[u8],
    ) -> Result<(String, String), CoreError> {
        let (name, cert, _) = self.enroll_bound(token, csr_der, sealing_key, None)?;
        Ok((name, cert))
    }

    /// Enrolls a host, bound to its TPM when it presents one: its EK and
    /// AK are checked before the token is used, and the answer carries the
    /// credential its TPM must activate to have the AK pinned
    /// ([`Core::prove_attestation_key`]).
    pub fn enroll_bound(
        &self,
        token: &str,
        csr_der: &[u8],
        sealing_key: &[u8],
        tpm: Option<&TpmIdentity>,
    ) -> Result<(String, String, Option<Credential>), CoreError> {
        let refuse = |why: String| {
            self.audit_refusal("unauthenticated", "enrollment", &why);
            CoreError::Denied(why)
        };
        let sealing_key = HostPublicKey::from_bytes(sealing_key)
            .map_err(|e| refuse(format!("enrollment refused: {e}")))?;
        let now = now_unix();
        let token_hash = hash_token(token);
        let Some(holder) = self.read(|tx| Ok(tx.host_by_token(&token_hash)?))? else {
            return Err(refuse("enrollment refused: the token is not valid (wrong, or already used): ask the admin for a new one with `guestkeyctl host add`".into()));
        };
        let name = holder.name;
        if holder.state != HostState::PendingEnrollment {
            return Err(refuse(format!(
                "enrollment refused: host {name} is {}",
                holder.state
            )));
        }
        if holder.expires.unwrap_or(0) < now {
            return Err(refuse(format!(
                "enrollment refused: the token of host {name} has expired: ask the admin for a new one"
            )));
        }
        // A host registered before names were checked (a data directory of
        // an older server) is checked here.
        let parsed = Name::parse("host name", &name)
            .map_err(|e| refuse(format!("enrollment refused: {e}")))?;
        self.refuse_server_names(&parsed, &holder.address)
            .map_err(|e| refuse(format!("enrollment refused: {e}")))?;
        let bound = tpm
            .map(|t| attest::bind(t, &self.ek_anchors))
            .transpose()
            .map_err(|e| refuse(format!("enrollment refused: host {name}'s TPM: {e}")))?;
        let host_part = crate::tls::tls_name(&holder.address).unwrap_or_default();
        let issued = self
            .ca
            .sign_csr(csr_der, &name, vec![host_part, name.clone()])
            .map_err(|e| refuse(format!("enrollment refused: {e}")))?;
        let enrolled = self.write(|tx| {
            let done = tx.complete_enrollment(&Enrollment {
                name: name.clone(),
                token_hash: token_hash.clone(),
                enrolled: now,
                cert_sha256: issued.sha256.clone(),
                sealing_key: sealing_key.as_bytes().to_vec(),
            })?;
            if done {
                let mut detail = format!("certificate sha256 {}", issued.sha256);
                if let Some((identity, _, signer)) = &bound {
                    tx.set_host_identity(&name, identity)?;
                    detail.push_str(&format!(
                        "; TPM endorsement key sha256 {}{}, attestation key to be proven",
                        hex::encode(sha2::Sha256::digest(&identity.ek_public)),
                        match (signer, identity.ek_certificate.is_some()) {
                            (Some(ca), _) => format!(" (its EK certificate signed by {ca})"),
                            (None, true) =>
                                " (with its EK certificate, not checked: no attestation.ek_ca_file)"
                                    .into(),
                            (None, false) => String::new(),
                        }
                    ));
                }
                self.log(tx, &format!("host:{name}"), "host.enrolled", &name, &detail)?;
            }
            Ok(done)
        })?;
        if !enrolled {
            return Err(refuse(
                "enrollment refused: the token was used concurrently".into(),
            ));
        }
        Ok((name, issued.cert, bound.map(|(_, c, _)| c)))
    }

    /// What a host needs to trust this server again (`guestkeyd
    /// trust-server`): the server CA (PEM) and the SHA-256 of the server's
    /// certificate. Only for an enrolled host (the transport checked its
    /// certificate); logged.
    pub fn server_trust(&self, host: &str) -> (String, String) {
        tracing::info!(%host, "a host asked for the server's CA and certificate hash");
        (self.server_ca_pem.clone(), self.server_cert_sha256.clone())
    }

    /// Records what a host reports holding: volume ids, generations and
    /// guest UUIDs (never keys). Replaces its previous report.
    pub fn record_inventory(&self, host: &str, held: &[HeldKey]) -> Result<(), CoreError> {
        self.write(|tx| Ok(tx.replace_inventory(host, held, now_unix())?))
    }

    /// Records what a host reported of its keys sealed to its TPM, after
    /// checking that it is plausible (bounded, PCRs 0 to 23, SHA-256 hex).
    pub fn record_tpm(&self, host: &str, mut tpm: HostTpm) -> Result<(), CoreError> {
        let bad = |why: String| {
            CoreError::Invalid(InvalidInput {
                what: "TPM report",
                value: host.to_owned(),
                why,
            })
        };
        if tpm.tcti.len() > 256 || tpm.pcrs.len() > 128 || tpm.authority.len() > 64 {
            return Err(bad("a field is longer than a TPM report's".into()));
        }
        if tpm.current.len() > 24 {
            return Err(bad("more than 24 PCRs".into()));
        }
        for (p, v) in &tpm.current {
            if *p > 23 || v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(format!("PCR {p} is not a SHA-256 PCR reading")));
            }
        }
        tpm.reported_unix = now_unix();
        self.write(|tx| Ok(tx.set_host_tpm(host, &tpm)?))
    }

    /// Records a host's progress report: replaces what it reported before.
    /// Only volumes assigned to it count.
    pub fn record_progress(
        &self,
        host: &str,
        running: Vec<ProgressReport>,
    ) -> Result<(), CoreError> {
        let mine: Vec<ProgressReport> = self.read(|tx| {
            let mut out = vec![];
            for r in running.into_iter().take(MAX_PROGRESS) {
                if tx.volume(&r.volume_id)?.is_some_and(|v| v.host == host) {
                    out.push(r);
                }
            }
            Ok(out)
        })?;
        let now = std::time::Instant::now();
        let mut map = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, p| p.host != host);
        for r in mine {
            map.insert(
                r.volume_id,
                Progress {
                    phase: r.phase.chars().take(64).collect(),
                    done_bytes: r.done_bytes,
                    total_bytes: r.total_bytes,
                    host: host.to_owned(),
                    at: Some(now),
                },
            );
        }
        Ok(())
    }

    /// An enrolled host's details for pushing, or why keys may not go to it.
    pub fn enrolled_host(&self, name: &str) -> Result<EnrolledHost, CoreError> {
        self.read(|tx| enrolled_in(tx, name))
    }

    /// Sets where other hosts' libvirt reaches this host's libvirt, and the
    /// QEMU migration URI for guests coming to it.
    pub fn set_host_migration(
        &self,
        caller: &Caller,
        name: &str,
        libvirt_uri: &str,
        migration_uri: &str,
    ) -> Result<HostInfo, CoreError> {
        let libvirt_uri = if libvirt_uri.is_empty() {
            String::new()
        } else {
            parse_libvirt_uri(libvirt_uri)?
        };
        let migration_uri = parse_migration_uri(migration_uri)?;
        self.write(|tx| {
            let h = tx.host(name)?.ok_or_else(|| no_such_host(name))?;
            tx.set_host_migration(&h.name, &libvirt_uri, &migration_uri)?;
            self.log(
                tx,
                &caller.actor(),
                "host.migration-set",
                &h.name,
                &format!("libvirt {libvirt_uri:?}, migration {migration_uri:?}"),
            )?;
            tx.host(&h.name)?.ok_or_else(|| no_such_host(&h.name))
        })
    }

    /// What the server knows of a disk a guest on `host` names without the
    /// host holding its key: the live volume at `path`, or of `pool` and
    /// `volume` (names and states, never a key). `None`: not a guestkey
    /// volume.
    pub fn describe_disk(
        &self,
        host: &str,
        q: &DiskQuery,
    ) -> Result<Option<DiskDescription>, CoreError> {
        self.read(|tx| {
            let found = match (q.path.is_empty(), q.volume.is_empty()) {
                (false, _) => tx.volume_at_path(&q.path)?,
                (true, false) => tx.volume_named(&q.volume)?.filter(|v| v.pool == q.pool),
                (true, true) => None,
            };
            tracing::debug!(%host, path = %q.path, known = found.is_some(), "disk described for a hook refusal");
            Ok(found.map(|v| DiskDescription {
                same_secret: v.secret_uuid == q.secret_uuid,
                volume: v.name,
                host: v.host,
                state: v.state.to_string(),
            }))
        })
    }
}

/// A disk a host asks about ([`Core::describe_disk`]).
#[derive(Debug, Clone, Default)]
pub struct DiskQuery {
    /// The disk's file (empty for a volume disk).
    pub path: String,
    /// Its pool (volume disks).
    pub pool: String,
    /// Its volume name (volume disks).
    pub volume: String,
    /// The libvirt secret its `<encryption>` names.
    pub secret_uuid: String,
}

/// What the server knows of such a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskDescription {
    /// The guestkey volume.
    pub volume: String,
    /// The host its key goes to.
    pub host: String,
    /// Its state.
    pub state: String,
    /// Whether the disk names the volume's own libvirt secret.
    pub same_secret: bool,
}
