//! The gRPC adapters, and the only files of this crate that import tonic
//! or prost: the host-agent service the management server calls ([`serve`],
//! a thin adapter over [`crate::ops::Daemon`] that only the pinned server
//! certificate may call, converting in [`pb`]), and this host's clients of
//! the server: [`enroll`], [`trust`] (`guestkeyd trust-server`), the
//! [`report`] loop and the [`lookup`] of disks, all through [`link`] (the
//! server CA and the pinned server certificate, never tonic's own TLS
//! settings, which cannot pin).
//!
//! May import everything below it. Imported by: the binary.

pub mod enroll;
mod link;
pub mod lookup;
pub mod metrics;
mod pb;
pub mod report;
pub mod tpm_report;
pub mod trust;
pub mod verifier;

use std::sync::Arc;

use guestkey_proto::agent::{
    self as apb,
    host_agent_server::{HostAgent, HostAgentServer},
};
use tonic::transport::Server;
use tonic::{Request, Response, Status};

use crate::ops::Daemon;

/// The host-agent service; only the pinned server certificate may call.
pub struct AgentService {
    /// The daemon.
    pub daemon: Arc<Daemon>,
    /// SHA-256 (hex) of the management server's certificate.
    pub server_sha256: String,
    /// This host's attestation key (None: enrolled without a TPM).
    pub attestation: Option<Arc<crate::protect::HostAttestation>>,
}

/// What [`serve`] needs.
pub struct Listen {
    /// The bound listener.
    pub listener: tokio::net::TcpListener,
    /// This host's certificate (PEM).
    pub cert: String,
    /// Its private key (PEM).
    pub key: zeroize::Zeroizing<String>,
    /// The server's CA (PEM).
    pub ca: String,
    /// SHA-256 (hex) of the one server certificate that may call.
    pub server_sha256: String,
    /// This host's attestation key (None: enrolled without a TPM).
    pub attestation: Option<crate::protect::HostAttestation>,
    /// Told of every call, for `/metrics` (None: not served).
    pub metrics: Option<Arc<dyn guestkey_rpc_metrics::Observer>>,
}

/// Serves the host-agent API over mutual TLS until `shutdown` completes.
pub async fn serve(
    daemon: Arc<Daemon>,
    l: Listen,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // Handshakes are guestkey_pinned_tls's, not tonic's: a server this host
    // does not trust reads the alert that says so, and the refusal is
    // logged here.
    let acceptor = guestkey_pinned_tls::Acceptor::new(
        &l.cert,
        &l.key,
        &l.ca,
        "the server CA this host trusts (ca.pem in its state directory)",
        guestkey_pinned_tls::ClientAuth::Required,
        "only the management server this host enrolled with may call; if that server ran \
         `guestkey-server migrate-roles`, run `guestkeyd trust-server --ca-file SERVER-CA.pem` here",
    )?;
    Server::builder()
        .layer(guestkey_rpc_metrics::RpcLayer(l.metrics))
        .add_service(HostAgentServer::new(AgentService {
            daemon,
            server_sha256: l.server_sha256,
            attestation: l.attestation.map(Arc::new),
        }))
        .serve_with_incoming_shutdown(acceptor.incoming(l.listener), shutdown)
        .await?;
    Ok(())
}

impl AgentService {
    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let fp = req.peer_certs().and_then(|c| {
            c.first()
                .map(|c| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(c.as_ref())))
        });
        match fp {
            Some(f) if f == self.server_sha256 => Ok(()),
            _ => Err(Status::permission_denied(
                "only this host's management server may call the host-agent API",
            )),
        }
    }

    /// Runs `f` on a blocking thread (libvirt, qemu-img and the store block).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Daemon) -> Result<T, crate::ops::OpsError> + Send + 'static,
    ) -> Result<T, Status> {
        let d = self.daemon.clone();
        tokio::task::spawn_blocking(move || f(&d))
            .await
            .map_err(|e| Status::internal(format!("guestkeyd's worker failed: {e}")))?
            .map_err(pb::status)
    }
}

type R<T> = Result<Response<T>, Status>;

fn volume_result(
    op_id: String,
    volume_id: String,
    path: String,
    capacity_bytes: u64,
) -> R<apb::VolumeResult> {
    Ok(Response::new(apb::VolumeResult {
        op_id,
        volume_id,
        path,
        capacity_bytes,
    }))
}

fn guest_result(op_id: String, guest_uuid: String, state: &str) -> R<apb::GuestResult> {
    Ok(Response::new(apb::GuestResult {
        op_id,
        guest_uuid,
        state: state.to_owned(),
    }))
}

fn state_name(s: Option<crate::model::DomainState>) -> &'static str {
    s.map_or("", crate::model::DomainState::as_str)
}

#[tonic::async_trait]
impl HostAgent for AgentService {
    async fn create_volume(&self, req: Request<apb::CreateVolumeRequest>) -> R<apb::VolumeResult> {
        self.check(&req)?;
        let r = req.into_inner();
        let (op_id, volume_id) = (r.op_id.clone(), r.volume_id.clone());
        let r = pb::create_volume(r)?;
        let (path, size) = self.blocking(move |d| d.create_volume(r)).await?;
        volume_result(op_id, volume_id, path, size)
    }

    async fn decrypt_volume(
        &self,
        req: Request<apb::DecryptVolumeRequest>,
    ) -> R<apb::VolumeResult> {
        self.check(&req)?;
        let r = req.into_inner();
        let (op_id, volume_id) = (r.op_id.clone(), r.volume_id.clone());
        let r = pb::decrypt_volume(r)?;
        let (path, size) = self.blocking(move |d| d.decrypt_volume(r)).await?;
        volume_result(op_id, volume_id, path, size)
    }

    async fn delete_volume(&self, req: Request<apb::DeleteVolumeRequest>) -> R<apb::VolumeResult> {
        self.check(&req)?;
        let r = req.into_inner();
        let (op_id, volume_id) = (r.op_id.clone(), r.volume_id.clone());
        let r = pb::delete_volume(r)?;
        self.blocking(move |d| d.delete_volume(r)).await?;
        volume_result(op_id, volume_id, String::new(), 0)
    }

    async fn define_guest(&self, req: Request<apb::DefineGuestRequest>) -> R<apb::GuestResult> {
        self.check(&req)?;
        let r = req.into_inner();
        let op_id = r.op_id.clone();
        let r = pb::define_guest(r)?;
        let (uuid, state) = self
            .blocking(move |d| {
                let uuid = d.define_guest(r)?;
                let state = d.guest_state(&uuid)?;
                Ok((uuid, state))
            })
            .await?;
        guest_result(op_id, uuid, state_name(state))
    }

    async fn undefine_guest(&self, req: Request<apb::GuestRequest>) -> R<apb::GuestResult> {
        self.check(&req)?;
        let r = req.into_inner();
        let uuid = pb::guest_uuid(&r.guest_uuid)?;
        self.blocking(move |d| d.undefine_guest(&uuid)).await?;
        guest_result(r.op_id, r.guest_uuid, "undefined")
    }

    async fn start_guest(&self, req: Request<apb::GuestRequest>) -> R<apb::GuestResult> {
        self.check(&req)?;
        let r = req.into_inner();
        let uuid = pb::guest_uuid(&r.guest_uuid)?;
        let state = self.blocking(move |d| d.start_guest(&uuid)).await?;
        guest_result(r.op_id, r.guest_uuid, state.as_str())
    }

    async fn stop_guest(&self, req: Request<apb::GuestRequest>) -> R<apb::GuestResult> {
        self.check(&req)?;
        let r = req.into_inner();
        let uuid = pb::guest_uuid(&r.guest_uuid)?;
        let state = self.blocking(move |d| d.stop_guest(&uuid)).await?;
        guest_result(r.op_id, r.guest_uuid, state.as_str())
    }

    async fn prepare_migration(
        &self,
        req: Request<apb::PrepareMigrationRequest>,
    ) -> R<apb::GuestResult> {
        self.check(&req)?;
        let r = req.into_inner();
        let op_id = r.op_id.clone();
        let r = pb::prepare_migration(r)?;
        let uuid = self.blocking(move |d| d.prepare_migration(r)).await?;
        guest_result(op_id, uuid, "prepared")
    }

    async fn abort_migration(&self, req: Request<apb::GuestRequest>) -> R<apb::GuestResult> {
        self.check(&req)?;
        let r = req.into_inner();
        let uuid = pb::guest_uuid(&r.guest_uuid)?;
        let state = self.blocking(move |d| d.abort_migration(&uuid)).await?;
        guest_result(r.op_id, r.guest_uuid, state_name(state))
    }

    async fn migrate_guest(&self, req: Request<apb::MigrateGuestRequest>) -> R<apb::GuestResult> {
        self.check(&req)?;
        let r = req.into_inner();
        let (op_id, uuid) = (r.op_id.clone(), r.guest_uuid.clone());
        let r = pb::migrate_guest(r)?;
        let state = self.blocking(move |d| d.migrate_guest(r)).await?;
        guest_result(op_id, uuid, state.as_str())
    }

    async fn rekey(&self, req: Request<apb::RekeyRequest>) -> R<apb::RekeyResult> {
        self.check(&req)?;
        let r = req.into_inner();
        let (op_id, volume_id) = (r.op_id.clone(), r.volume_id.clone());
        let r = pb::rekey(r)?;
        let active_generation = self.blocking(move |d| d.rekey(r)).await?;
        Ok(Response::new(apb::RekeyResult {
            op_id,
            volume_id,
            active_generation,
            state: "done".into(),
        }))
    }

    async fn ping(&self, req: Request<apb::PingRequest>) -> R<apb::PingResult> {
        self.check(&req)?;
        Ok(Response::new(apb::PingResult {}))
    }

    async fn attest(&self, req: Request<apb::AttestRequest>) -> R<apb::AttestResult> {
        self.check(&req)?;
        let Some(a) = self.attestation.clone() else {
            return Err(Status::failed_precondition(
                "this host was enrolled without a TPM: it has no attestation key (enroll it with `guestkeyd enroll --tpm`)",
            ));
        };
        let r = req.into_inner();
        let pcrs = r
            .pcrs
            .iter()
            .map(|p| u8::try_from(*p).unwrap_or(u8::MAX))
            .collect::<Vec<u8>>();
        let q = tokio::task::spawn_blocking(move || a.quote(&r.nonce, &pcrs))
            .await
            .map_err(|e| Status::internal(format!("guestkeyd's worker failed: {e}")))?
            .map_err(|e| Status::failed_precondition(format!("cannot quote: {e}")))?;
        Ok(Response::new(apb::AttestResult {
            quote: q.attest,
            signature: q.signature,
            values: q
                .values
                .iter()
                .map(|(pcr, v)| apb::QuotedPcr {
                    pcr: u32::from(pcr),
                    sha256: v.0.to_vec(),
                })
                .collect(),
        }))
    }

    async fn describe_domain(
        &self,
        req: Request<apb::DescribeDomainRequest>,
    ) -> R<apb::DomainDescription> {
        self.check(&req)?;
        let name = req.into_inner().domain;
        let d = self.blocking(move |d| d.describe_domain(&name)).await?;
        Ok(Response::new(pb::domain_description(d)))
    }

    async fn describe_pool(
        &self,
        req: Request<apb::DescribePoolRequest>,
    ) -> R<apb::PoolDescription> {
        self.check(&req)?;
        let pool = req.into_inner().pool;
        let d = self.blocking(move |d| d.describe_pool(&pool)).await?;
        Ok(Response::new(pb::pool_description(d)))
    }

    async fn make_escrow_packet(
        &self,
        req: Request<apb::EscrowPacketRequest>,
    ) -> R<apb::EscrowPacketResult> {
        self.check(&req)?;
        let r = pb::escrow_packet(req.into_inner())?;
        let volume_id = r.volume.to_string();
        let e = self.blocking(move |d| d.make_escrow_packet(r)).await?;
        Ok(Response::new(apb::EscrowPacketResult {
            volume_id,
            packet: e.packet,
            luks_uuid: e.luks_uuid,
        }))
    }

    async fn get_inventory(&self, req: Request<apb::InventoryRequest>) -> R<apb::InventoryResult> {
        self.check(&req)?;
        let held = self.blocking(|d| d.inventory()).await?;
        Ok(Response::new(apb::InventoryResult {
            held: held.into_iter().map(pb::held).collect(),
            host_uuid: String::new(),
        }))
    }
}
