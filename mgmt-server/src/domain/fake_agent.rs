//! A fake [`AgentClient`]: it stands in for the hosts in the domain's unit
//! tests only, where no host daemon runs. It opens every sealed key with
//! the sealing key of the host it was sent to (a packet sealed to another
//! host fails, as on a real host), records what each host received, keeps
//! which guests each host has, and fails calls as a test scripts.
//!
//! The real flows are tested elsewhere: the gRPC client against an
//! instrumented host-agent peer in `mgmt-server/tests/`, and against the
//! real guestkeyd, libvirtd and KVM in `tests/`.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;

use xdr_wipe::packet::VolumeId;
use xdr_wipe::seal::HostSealingKey;

use crate::domain::agent::{
    AgentClient, AgentError, AgentErrorKind, AgentResult, BoxFuture, CreateVolume, DecryptVolume,
    DefineGuest, DeleteVolume, DomainDescription, EscrowPacketCall, EscrowPacketMade, GuestCall,
    Inventory, MigrateGuest, PoolDescription, PrepareMigration, Rekey, SealedKey, VolumeOnHost,
};
use crate::model::{EnrolledHost, GuestState};

/// What a fake host was asked, with the keys it could open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Call {
    Create {
        volume: String,
        generation: u64,
        encrypt: bool,
    },
    Decrypt {
        volume: String,
    },
    Delete {
        volume: String,
    },
    Rekey {
        volume: String,
        old: u64,
        new: u64,
    },
    Define {
        uuid: String,
        keys: Vec<(String, u64)>,
    },
    Undefine {
        uuid: String,
    },
    Start {
        uuid: String,
    },
    Stop {
        uuid: String,
    },
    Prepare {
        uuid: String,
        keys: Vec<(String, u64)>,
    },
    Abort {
        uuid: String,
    },
    Migrate {
        uuid: String,
    },
    Escrow {
        volume: String,
        generation: u64,
        recipients: Vec<String>,
    },
}

#[derive(Default)]
struct FakeHost {
    sealing: Option<HostSealingKey>,
    down: bool,
    /// Scripted failures by method name, used up in order.
    failures: HashMap<&'static str, VecDeque<AgentError>>,
    /// Methods that fail every time, until cleared.
    always: HashMap<&'static str, AgentError>,
    /// Guests defined here and their states.
    guests: HashMap<String, GuestState>,
    /// Keys held (volume, generation), of guests and prepared migrations.
    keys: BTreeSet<(String, u64)>,
    calls: Vec<Call>,
    /// Domains its libvirt has, as `describe_domain` answers.
    domains: Vec<DomainDescription>,
    /// Storage pools its libvirt has, as `describe_pool` answers.
    pools: HashMap<String, PoolDescription>,
}

/// Fake hosts by name.
#[derive(Default)]
pub(crate) struct FakeAgents {
    hosts: Mutex<HashMap<String, FakeHost>>,
}

fn uuid_of(xml: &str) -> String {
    crate::domxml::parse(xml)
        .ok()
        .and_then(|d| d.uuid)
        .unwrap_or_default()
        .to_ascii_lowercase()
}

impl FakeAgents {
    /// A host that opens packets with `sealing`.
    pub(crate) fn add_host(&self, name: &str, sealing: HostSealingKey) {
        self.lock().entry(name.to_owned()).or_default().sealing = Some(sealing);
    }

    /// A domain in the host's libvirt, for `describe_domain`.
    pub(crate) fn set_domain(&self, host: &str, d: DomainDescription) {
        let mut hosts = self.lock();
        let h = hosts.entry(host.to_owned()).or_default();
        h.domains.retain(|o| o.uuid != d.uuid);
        h.domains.push(d);
    }

    /// A storage pool in the host's libvirt, for `describe_pool`.
    pub(crate) fn set_pool(&self, host: &str, pool: &str, d: PoolDescription) {
        let mut hosts = self.lock();
        let h = hosts.entry(host.to_owned()).or_default();
        h.pools.insert(pool.to_owned(), d);
    }

    /// Takes a host off the network, or back.
    pub(crate) fn set_down(&self, name: &str, down: bool) {
        self.lock().entry(name.to_owned()).or_default().down = down;
    }

    /// The next call of `method` on `host` fails with `kind`.
    pub(crate) fn fail_next(&self, host: &str, method: &'static str, kind: AgentErrorKind) {
        let e = AgentError::new(
            kind,
            format!("host {host} refused: scripted {method} failure"),
        );
        self.lock()
            .entry(host.to_owned())
            .or_default()
            .failures
            .entry(method)
            .or_default()
            .push_back(e);
    }

    /// Every call of `method` on `host` fails with `kind` (None: no longer).
    pub(crate) fn fail_always(
        &self,
        host: &str,
        method: &'static str,
        kind: Option<AgentErrorKind>,
    ) {
        let mut all = self.lock();
        let h = all.entry(host.to_owned()).or_default();
        match kind {
            Some(k) => {
                let e = AgentError::new(k, format!("host {host} refused: {method} always fails"));
                h.always.insert(method, e);
            }
            None => {
                h.always.remove(method);
            }
        }
    }

    /// Puts a guest on a host as if libvirt had moved it there.
    pub(crate) fn place_guest(&self, host: &str, uuid: &str, state: GuestState) {
        self.lock()
            .entry(host.to_owned())
            .or_default()
            .guests
            .insert(uuid.to_owned(), state);
    }

    /// What `host` was asked so far.
    pub(crate) fn calls(&self, host: &str) -> Vec<Call> {
        self.lock()
            .get(host)
            .map(|h| h.calls.clone())
            .unwrap_or_default()
    }

    /// The guests `host` has.
    pub(crate) fn guests(&self, host: &str) -> Vec<String> {
        let mut g: Vec<String> = self
            .lock()
            .get(host)
            .map(|h| h.guests.keys().cloned().collect())
            .unwrap_or_default();
        g.sort();
        g
    }

    /// The keys `host` holds.
    pub(crate) fn keys(&self, host: &str) -> BTreeSet<(String, u64)> {
        self.lock()
            .get(host)
            .map(|h| h.keys.clone())
            .unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, FakeHost>> {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one call on a fake host: unreachable when down, a scripted
    /// failure if one is queued, else `f` with the host.
    fn on<T>(
        &self,
        host: &EnrolledHost,
        method: &'static str,
        f: impl FnOnce(&mut FakeHost, &mut HashMap<String, FakeHost>) -> AgentResult<T>,
    ) -> AgentResult<T> {
        let mut all = self.lock();
        let Some(mut h) = all.remove(&host.name) else {
            return Err(AgentError::new(
                AgentErrorKind::Unreachable,
                format!(
                    "host {} at {} is unreachable: no such fake host",
                    host.name, host.address
                ),
            ));
        };
        let r = if h.down {
            Err(AgentError::new(
                AgentErrorKind::Unreachable,
                format!(
                    "host {} at {} is unreachable: it is down",
                    host.name, host.address
                ),
            ))
        } else if let Some(e) = h.failures.get_mut(method).and_then(VecDeque::pop_front) {
            Err(e)
        } else if let Some(e) = h.always.get(method) {
            Err(e.clone())
        } else {
            f(&mut h, &mut all)
        };
        all.insert(host.name.clone(), h);
        r
    }
}

/// Opens a sealed key as `host` would; a packet for another host, volume
/// or generation is refused.
fn open(h: &FakeHost, host: &str, k: &SealedKey) -> AgentResult<(String, u64)> {
    let refuse = |why: String| {
        AgentError::new(
            AgentErrorKind::Refused,
            format!("host {host} refused: {why}"),
        )
    };
    let sealing = h
        .sealing
        .as_ref()
        .ok_or_else(|| refuse("no sealing key".into()))?;
    let vid = VolumeId(uuid::Uuid::parse_str(&k.volume_id).map_err(|e| refuse(e.to_string()))?);
    let id = xdr_wipe::XdrString::new(host.to_owned()).map_err(|e| refuse(e.to_string()))?;
    xdr_wipe::seal::open(&k.sealed, sealing, &id, vid, k.generation)
        .map_err(|e| refuse(e.to_string()))?;
    Ok((k.volume_id.clone(), k.generation))
}

/// A guest's keys; an empty packet (a key the host is not to keep) is
/// taken as it is, as guestkeyd does.
fn open_all(h: &FakeHost, host: &str, keys: &[SealedKey]) -> AgentResult<Vec<(String, u64)>> {
    keys.iter()
        .map(|k| {
            if k.sealed.is_empty() {
                Ok((k.volume_id.clone(), k.generation))
            } else {
                open(h, host, k)
            }
        })
        .collect()
}

fn ready<T: Send + 'static>(r: AgentResult<T>) -> BoxFuture<'static, AgentResult<T>> {
    Box::pin(async move { r })
}

impl AgentClient for FakeAgents {
    fn connect<'a>(&'a self, host: &'a EnrolledHost) -> BoxFuture<'a, AgentResult<()>> {
        ready(self.on(host, "connect", |_, _| Ok(())))
    }

    fn create_volume<'a>(
        &'a self,
        host: &'a EnrolledHost,
        r: CreateVolume,
    ) -> BoxFuture<'a, AgentResult<VolumeOnHost>> {
        ready(self.on(host, "create_volume", |h, _| {
            let (volume, generation) = open(h, &host.name, &r.key)?;
            h.calls.push(Call::Create {
                volume,
                generation,
                encrypt: r.encrypt_existing,
            });
            Ok(VolumeOnHost {
                path: format!("/fake/{}/{}", r.pool, r.volume_id),
                capacity_bytes: if r.encrypt_existing {
                    1 << 30
                } else {
                    r.capacity_bytes
                },
            })
        }))
    }

    fn decrypt_volume<'a>(
        &'a self,
        host: &'a EnrolledHost,
        r: DecryptVolume,
    ) -> BoxFuture<'a, AgentResult<()>> {
        ready(self.on(host, "decrypt_volume", |h, _| {
            open(h, &host.name, &r.key)?;
            h.calls.push(Call::Decrypt {
                volume: r.volume_id,
            });
            Ok(())
        }))
    }

    fn delete_volume<'a>(
        &'a self,
        host: &'a EnrolledHost,
        r: DeleteVolume,
    ) -> BoxFuture<'a, AgentResult<()>> {
        ready(self.on(host, "delete_volume", |h, _| {
            h.keys.retain(|(v, _)| *v != r.volume_id);
            h.calls.push(Call::Delete {
                volume: r.volume_id,
            });
            Ok(())
        }))
    }

    fn rekey<'a>(&'a self, host: &'a EnrolledHost, r: Rekey) -> BoxFuture<'a, AgentResult<()>> {
        ready(self.on(host, "rekey", |h, _| {
            let (volume, old) = open(h, &host.name, &r.old_key)?;
            let (_, new) = open(h, &host.name, &r.new_key)?;
            h.calls.push(Call::Rekey { volume, old, new });
            Ok(())
        }))
    }

    fn define_guest<'a>(
        &'a self,
        host: &'a EnrolledHost,
        r: DefineGuest,
    ) -> BoxFuture<'a, AgentResult<Option<GuestState>>> {
        ready(self.on(host, "define_guest", |h, _| {
            let keys = open_all(h, &host.name, &r.keys)?;
            let uuid = uuid_of(&r.domain_xml);
            h.keys.extend(keys.iter().cloned());
            h.guests.insert(uuid.clone(), GuestState::ShutOff);
            h.calls.push(Call::Define { uuid, keys });
            Ok(Some(GuestState::ShutOff))
        }))
    }

    fn undefine_guest<'a>(
        &'a self,
        host: &'a EnrolledHost,
        r: GuestCall,
    ) -> BoxFuture<'a, AgentResult<Option<GuestState>>> {
        ready(self.on(host, "undefine_guest", |h, _| {
            h.guests.remove(&r.guest_uuid);
            h.calls.push(Call::Undefine { uuid: r.guest_uuid });
            Ok(Some(GuestState::Undefined))
        }))
    }

    fn start_guest<'a>(
        &'a self,
        host: &'a EnrolledHost,
        r: GuestCall,
    ) -> BoxFuture<'a, AgentResult<Option<GuestState>>> {
        ready(self.on(host, "start_guest", |h, _| {
            h.guests.insert(r.guest_uuid.clone(), GuestState::Running);
            h.calls.push(Call::Start { uuid: r.guest_uuid });
            Ok(Some(GuestState::Running))
        }))
    }

    fn stop_guest<'a>(
        &'a self,
        host: &'a EnrolledHost,
        r: GuestCall,
    ) -> BoxFuture<'a, AgentResult<Option<GuestState>>> {
        ready(self.on(host, "stop_guest", |h, _| {
            h.guests.insert(r.guest_uuid.clone(), GuestState::ShutOff);
            h.calls.push(Call::Stop { uuid: r.guest_uuid });
            Ok(Some(GuestState::ShutOff))
        }))
    }

    fn prepare_migration<'a>(
        &'a self,
        host: &'a EnrolledHost,
        r: PrepareMigration,
    ) -> BoxFuture<'a, AgentResult<()>> {
        ready(self.on(host, "prepare_migration", |h, _| {
            let keys = open_all(h, &host.name, &r.keys)?;
            h.keys.extend(keys.iter().cloned());
            h.calls.push(Call::Prepare {
                uuid: uuid_of(&r.domain_xml),
                keys,
            });
            Ok(())
        }))
    }

    fn abort_migration<'a>(
        &'a self,
        host: &'a EnrolledHost,
        r: GuestCall,
    ) -> BoxFuture<'a, AgentResult<Option<GuestState>>> {
        ready(self.on(host, "abort_migration", |h, _| {
            h.calls.push(Call::Abort {
                uuid: r.guest_uuid.clone(),
            });
            let here = h.guests.get(&r.guest_uuid).copied();
            if here.is_none() {
                h.keys.clear();
            }
            Ok(here)
        }))
    }

    fn migrate_guest<'a>(
        &'a self,
        host: &'a EnrolledHost,
        r: MigrateGuest,
    ) -> BoxFuture<'a, AgentResult<Option<GuestState>>> {
        ready(self.on(host, "migrate_guest", |h, others| {
            h.calls.push(Call::Migrate {
                uuid: r.guest_uuid.clone(),
            });
            // The destination is the fake host whose name is in the URI.
            let dest = others
                .iter_mut()
                .find(|(name, _)| r.destination_libvirt_uri.contains(name.as_str()))
                .map(|(_, d)| d);
            let (Some(dest), Some(state)) = (dest, h.guests.remove(&r.guest_uuid)) else {
                return Err(AgentError::new(
                    AgentErrorKind::Refused,
                    format!(
                        "host {} refused: no guest {} or no destination",
                        host.name, r.guest_uuid
                    ),
                ));
            };
            dest.guests.insert(r.guest_uuid.clone(), state);
            h.keys.clear();
            Ok(Some(state))
        }))
    }

    fn describe_pool<'a>(
        &'a self,
        host: &'a EnrolledHost,
        pool: &'a str,
    ) -> BoxFuture<'a, AgentResult<PoolDescription>> {
        ready(self.on(host, "describe_pool", |h, _| {
            h.pools.get(pool).cloned().ok_or_else(|| {
                AgentError::new(
                    AgentErrorKind::Refused,
                    format!("no storage pool named {pool} on this host"),
                )
            })
        }))
    }

    fn describe_domain<'a>(
        &'a self,
        host: &'a EnrolledHost,
        name_or_uuid: &'a str,
    ) -> BoxFuture<'a, AgentResult<DomainDescription>> {
        ready(self.on(host, "describe_domain", |h, _| {
            h.domains
                .iter()
                .find(|d| {
                    d.uuid == name_or_uuid
                        || crate::domxml::parse(&d.xml).is_ok_and(|x| x.name == name_or_uuid)
                })
                .cloned()
                .ok_or_else(|| {
                    AgentError::new(
                        AgentErrorKind::Refused,
                        format!("no domain named or with UUID {name_or_uuid:?} is defined in this host's libvirt"),
                    )
                })
        }))
    }

    fn inventory<'a>(&'a self, host: &'a EnrolledHost) -> BoxFuture<'a, AgentResult<Inventory>> {
        ready(self.on(host, "inventory", |_, _| Ok(Inventory::default())))
    }

    fn make_escrow_packet<'a>(
        &'a self,
        host: &'a EnrolledHost,
        r: EscrowPacketCall,
    ) -> BoxFuture<'a, AgentResult<EscrowPacketMade>> {
        // Fixed, non-secret bytes: the packet's making (age, the LUKS
        // header) is guestkeyd's, tested there.
        ready(self.on(host, "make_escrow_packet", |h, _| {
            let (volume, generation) = open(h, &host.name, &r.key)?;
            let packet = format!("fake escrow packet {} of {volume}", r.packet_id).into_bytes();
            h.calls.push(Call::Escrow {
                volume,
                generation,
                recipients: r.recipients,
            });
            Ok(EscrowPacketMade {
                packet,
                luks_uuid: "0d6f1a3e-7c2b-4e59-9a41-3b8c5d2e1f00".into(),
            })
        }))
    }

    fn attest<'a>(
        &'a self,
        host: &'a EnrolledHost,
        _req: crate::domain::agent::AttestChallenge,
    ) -> BoxFuture<'a, AgentResult<crate::domain::agent::QuoteAnswer>> {
        // The fake host has no TPM; attestation is tested against swtpm
        // and the real guestkeyd (tests/tests/attestation.rs).
        ready(self.on(host, "attest", |_, _| {
            Err(AgentError::new(
                AgentErrorKind::Refused,
                "this fake host has no TPM",
            ))
        }))
    }
}
