//! A process that claims to be the management server: it serves the host
//! API over TLS with a key pair that is not the server's (a real host's,
//! or a certificate of the server CA that is not the server's) and
//! answers `Enroll` and `GetServerTrust` with what an attacker would want a
//! host to pin. It records every call that reached it. guestkeyd must
//! refuse it before any call (another CA), or refuse its answer (a hash
//! that is not the certificate it presented).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use guestkey_proto::host::{self as hpb, host_api_server::HostApi, host_api_server::HostApiServer};
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

/// The impostor, serving until dropped.
pub struct Impostor {
    /// Its port on 127.0.0.1.
    pub port: u16,
    calls: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    rt: tokio::runtime::Runtime,
}

struct Service {
    calls: Arc<AtomicUsize>,
    answer: hpb::EnrollResponse,
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl HostApi for Service {
    async fn enroll(&self, _: Request<hpb::EnrollRequest>) -> R<hpb::EnrollResponse> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(self.answer.clone()))
    }
    async fn report_inventory(
        &self,
        _: Request<hpb::Inventory>,
    ) -> R<hpb::ReportInventoryResponse> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(hpb::ReportInventoryResponse::default()))
    }
    async fn report_progress(
        &self,
        _: Request<hpb::ProgressReport>,
    ) -> R<hpb::ReportInventoryResponse> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(hpb::ReportInventoryResponse::default()))
    }
    async fn report_tpm(&self, _: Request<hpb::TpmReport>) -> R<hpb::ReportInventoryResponse> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(hpb::ReportInventoryResponse::default()))
    }
    async fn describe_disk(&self, _: Request<hpb::DescribeDiskRequest>) -> R<hpb::DiskDescription> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(hpb::DiskDescription::default()))
    }
    async fn get_server_trust(&self, _: Request<hpb::ServerTrustRequest>) -> R<hpb::ServerTrust> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(hpb::ServerTrust {
            ca_certificate_pem: self.answer.ca_certificate_pem.clone(),
            server_certificate_sha256: self.answer.server_certificate_sha256.clone(),
        }))
    }
    async fn release_keys(&self, _: Request<hpb::ReleaseKeysRequest>) -> R<hpb::ReleasedKeys> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(hpb::ReleasedKeys::default()))
    }
    async fn prove_attestation_key(
        &self,
        _: Request<hpb::AttestationProof>,
    ) -> R<hpb::AttestationProven> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(hpb::AttestationProven::default()))
    }
    async fn half_challenge(
        &self,
        _: Request<hpb::HalfChallengeRequest>,
    ) -> R<hpb::HalfChallengeResponse> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(hpb::HalfChallengeResponse::default()))
    }
    async fn release_halves(&self, _: Request<hpb::ReleaseHalvesRequest>) -> R<hpb::ReleasedKeys> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(hpb::ReleasedKeys::default()))
    }
    async fn forget_halves(&self, _: Request<hpb::ForgetHalvesRequest>) -> R<hpb::HalvesForgotten> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(hpb::HalvesForgotten::default()))
    }
}

impl Impostor {
    /// Serves TLS with `cert` and `key` (PEM) on a free port of 127.0.0.1;
    /// `Enroll` answers `answer`, `GetServerTrust` its CA and hash.
    pub fn start(cert: &str, key: &str, answer: hpb::EnrollResponse) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(SocketAddr::from((
                [127, 0, 0, 1],
                0,
            ))))
            .expect("a port");
        let port = listener.local_addr().expect("its address").port();
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = Service {
            calls: calls.clone(),
            answer,
        };
        let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        rt.spawn(async move {
            let _ = Server::builder()
                .tls_config(tls)
                .expect("TLS settings")
                .add_service(HostApiServer::new(svc))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = rx.await;
                    },
                )
                .await;
        });
        Self {
            port,
            calls,
            stop: Some(tx),
            rt,
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// How many calls reached it.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for Impostor {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = &self.rt;
    }
}
