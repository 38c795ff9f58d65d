//! The server, asked about a disk the hook refuses ([`DiskLookup`]): one
//! `DescribeDisk` call on this host's certificate, bounded to 3 s, so that a
//! refusal can name the volume and the host its key goes to. The server
//! answers names and states only.

use std::time::Duration;

use guestkey_proto::host::{
    DescribeDiskRequest, ReleaseKeysRequest, ReleasedKeys, host_api_client::HostApiClient,
};
use tonic::transport::Channel;
use virt_plugin::protocol::Source;

use super::link::ServerLink;
use crate::model::VolumeId;
use crate::ops::requests::SealedKey;
use crate::ops::{DiskLookup, KnownDisk};
use crate::state::StateDir;

/// How long a refusal waits for the server.
const ANSWER: Duration = Duration::from_secs(3);
/// How long a start waits for the server to release its keys: an
/// attestation of this host, and an operator's approval, which the server
/// bounds itself (`limits.approval_wait_secs`); this bounds only a server
/// that never answers.
const RELEASE: Duration = Duration::from_secs(900);

/// The look-up over gRPC; called from blocking threads.
pub struct ServerLookup {
    rt: tokio::runtime::Handle,
    link: ServerLink,
    client: tokio::sync::Mutex<Option<HostApiClient<Channel>>>,
}

impl ServerLookup {
    /// The look-up for this state directory's server (None: not enrolled,
    /// or its server files are unusable, which the reports log).
    pub fn new(dir: &StateDir, rt: tokio::runtime::Handle) -> Option<Self> {
        let link = ServerLink::from_state(dir).ok()??;
        Some(Self {
            rt,
            link,
            client: tokio::sync::Mutex::new(None),
        })
    }
}

impl DiskLookup for ServerLookup {
    fn describe(&self, source: &Source, secret: &str) -> Option<KnownDisk> {
        let (path, pool, volume) = match source {
            Source::Path(p) => (p.clone(), String::new(), String::new()),
            Source::Volume { pool, volume } => (String::new(), pool.clone(), volume.clone()),
            Source::Unknown => return None,
        };
        let req = DescribeDiskRequest {
            path,
            pool,
            volume,
            secret_uuid: secret.to_owned(),
        };
        let ask = async {
            let mut guard = self.client.lock().await;
            let c = super::report::connected(&mut guard, &self.link)
                .await
                .ok()?;
            match c.describe_disk(req).await {
                Ok(r) => Some(r.into_inner()),
                Err(e) => {
                    tracing::debug!(error = %e, "the server did not describe the disk");
                    *guard = None;
                    None
                }
            }
        };
        let d = self
            .rt
            .block_on(async { tokio::time::timeout(ANSWER, ask).await.ok().flatten() })?;
        d.known.then_some(KnownDisk {
            volume: d.volume,
            host: d.host,
            state: d.state,
            same_secret: d.same_secret,
        })
    }

    fn release(&self, uuid: &str) -> Result<Vec<SealedKey>, String> {
        let req = ReleaseKeysRequest {
            guest_uuid: uuid.to_owned(),
        };
        let ask = async {
            // A copy of the client: a start that waits (for an operator's
            // approval) holds up no other call to the server.
            let mut c = {
                let mut guard = self.client.lock().await;
                super::report::connected(&mut guard, &self.link)
                    .await
                    .map_err(|e| format!("cannot reach it: {e}"))?
                    .clone()
            };
            match c.release_keys(req).await {
                Ok(r) => Ok(r.into_inner()),
                Err(e) => {
                    if e.code() == tonic::Code::Unavailable {
                        *self.client.lock().await = None;
                    }
                    Err(e.message().to_owned())
                }
            }
        };
        let r = self.rt.block_on(async {
            tokio::time::timeout(RELEASE, ask)
                .await
                .map_err(|_| format!("it did not answer within {} s", RELEASE.as_secs()))?
        })?;
        sealed_keys(r)
    }
}

/// What a server released (keys, or a verifier's halves), as the daemon
/// takes them; a volume id that is not a UUID is refused by name.
pub(super) fn sealed_keys(r: ReleasedKeys) -> Result<Vec<SealedKey>, String> {
    r.keys
        .into_iter()
        .map(|k| {
            Ok(SealedKey {
                volume: uuid::Uuid::parse_str(&k.volume_id)
                    .map(VolumeId)
                    .map_err(|_| {
                        format!("it sent a key of volume {:?}, not a UUID", k.volume_id)
                    })?,
                generation: k.generation,
                sealed: k.sealed_packet,
            })
        })
        .collect()
}
