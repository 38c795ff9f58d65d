//! The connector against a real TLS server on 127.0.0.1 (tokio-rustls),
//! with certificates made here: the right one, another leaf of the same
//! CA (refused by the pin), one of another CA (another role), one for
//! another name, one without serverAuth (an admin certificate).

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

struct TestCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca() -> TestCa {
    named_ca("test CA")
}

fn named_ca(name: &str) -> TestCa {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_owned());
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let cert = p.self_signed(&key).unwrap();
    TestCa {
        pem: cert.pem(),
        issuer: Issuer::new(p, key),
    }
}

/// (certificate PEM, key PEM, sha256)
fn leaf(
    ca: &TestCa,
    names: &[&str],
    ekus: Vec<ExtendedKeyUsagePurpose>,
) -> (String, String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.extended_key_usages = ekus;
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    let sha = cert_sha256(cert.der());
    (cert.pem(), key.serialize_pem(), sha)
}

fn server_leaf(ca: &TestCa, names: &[&str]) -> (String, String, String) {
    leaf(
        ca,
        names,
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    )
}

/// Serves one TLS connection with (cert, key), requiring a client
/// certificate of `client_ca` if given; answers "ok" to what it reads.
async fn serve_once(cert: &str, key: &str, client_ca: Option<&str>) -> u16 {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let config = match client_ca {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(v)
        }
    }
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        if let Ok(mut tls) = acceptor.accept(tcp).await {
            let mut b = [0u8; 2];
            if tls.read_exact(&mut b).await.is_ok() {
                let _ = tls.write_all(b"ok").await;
            }
        }
    });
    port
}

fn peer(roots: &str, name: &str, pin: Option<&str>) -> Peer {
    Peer {
        who: "the server".into(),
        roots_pem: roots.into(),
        roots_from: "the test CA".into(),
        name: name.into(),
        pin: pin.map(str::to_owned),
        hint: "is this the right server?".into(),
    }
}

async fn talk(c: &Connector, port: u16) -> Result<String, ConnectError> {
    let mut s = c.connect("127.0.0.1", port).await?;
    s.write_all(b"hi").await.unwrap();
    let mut b = [0u8; 2];
    s.read_exact(&mut b).await.unwrap();
    Ok(String::from_utf8_lossy(&b).into_owned())
}

#[tokio::test]
async fn the_pinned_certificate_of_the_right_ca_and_name_is_accepted() {
    let ca = ca();
    let (cert, key, sha) = server_leaf(&ca, &["127.0.0.1", "localhost"]);
    let port = serve_once(&cert, &key, None).await;
    let c = Connector::new(peer(&ca.pem, "127.0.0.1", Some(&sha.to_uppercase())), None).unwrap();
    assert_eq!(talk(&c, port).await.unwrap(), "ok");
    assert_eq!(c.verified_sha256().as_deref(), Some(sha.as_str()));
}

#[tokio::test]
async fn another_certificate_of_the_same_ca_is_refused_by_the_pin() {
    let ca = ca();
    let (_, _, pinned) = server_leaf(&ca, &["127.0.0.1"]);
    let (cert, key, other) = server_leaf(&ca, &["127.0.0.1"]);
    let port = serve_once(&cert, &key, None).await;
    let c = Connector::new(peer(&ca.pem, "127.0.0.1", Some(&pinned)), None).unwrap();
    let e = talk(&c, port).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "the server presented a certificate that is not the pinned one (sha256 {other}, expected {pinned}): is this the right server?"
        )
    );
    assert_eq!(c.verified_sha256(), None);
}

#[tokio::test]
async fn a_certificate_of_another_ca_is_refused_whatever_its_names() {
    let ours = ca();
    // Another role's CA, and another installation's CA of the same name.
    for theirs in [named_ca("hosts CA"), ca()] {
        let (cert, key, sha) = server_leaf(&theirs, &["127.0.0.1", "localhost"]);
        let port = serve_once(&cert, &key, None).await;
        // Even pinned, a certificate of another CA is refused: the chain
        // is checked first.
        let c = Connector::new(peer(&ours.pem, "127.0.0.1", Some(&sha)), None).unwrap();
        let e = talk(&c, port).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "the server presented a certificate that the test CA did not sign: is this the right server?"
        );
    }
}

#[tokio::test]
async fn a_certificate_for_another_name_or_without_server_auth_is_refused() {
    let ca = ca();
    let (cert, key, _) = server_leaf(&ca, &["kvm-01"]);
    let port = serve_once(&cert, &key, None).await;
    let c = Connector::new(peer(&ca.pem, "127.0.0.1", None), None).unwrap();
    let e = talk(&c, port).await.unwrap_err().to_string();
    assert!(
        e.starts_with("the server presented a certificate that the test CA does not accept (")
            && e.contains("kvm-01"),
        "{e}"
    );

    let (cert, key, _) = leaf(
        &ca,
        &["127.0.0.1"],
        vec![ExtendedKeyUsagePurpose::ClientAuth],
    );
    let port = serve_once(&cert, &key, None).await;
    let c = Connector::new(peer(&ca.pem, "127.0.0.1", None), None).unwrap();
    let e = talk(&c, port).await.unwrap_err().to_string();
    assert!(
        e.contains("does not accept") && e.contains("extended key usage"),
        "{e}"
    );
}

#[tokio::test]
async fn a_client_certificate_is_presented_when_given() {
    let server_ca = ca();
    let client_ca = ca();
    let (cert, key, _) = server_leaf(&server_ca, &["127.0.0.1"]);
    let (client_cert, client_key, _) =
        leaf(&client_ca, &[], vec![ExtendedKeyUsagePurpose::ClientAuth]);
    let port = serve_once(&cert, &key, Some(&client_ca.pem)).await;
    let c = Connector::new(
        peer(&server_ca.pem, "127.0.0.1", None),
        Some((&client_cert, &client_key)),
    )
    .unwrap();
    assert_eq!(talk(&c, port).await.unwrap(), "ok");
}

#[test]
fn bad_settings_are_named() {
    let ca = ca();
    let e = |p: Peer| Connector::new(p, None).err().unwrap().to_string();
    assert_eq!(
        e(peer("not pem", "127.0.0.1", None)),
        "the test CA holds no PEM certificate"
    );
    assert!(
        e(peer(&ca.pem, "127.0.0.1", Some("abc"))).contains("is not a SHA-256"),
        "pin"
    );
    assert!(e(peer(&ca.pem, "", None)).contains("not a DNS name or IP address"));
}

#[test]
fn names_and_endpoints() {
    assert_eq!(
        tls_name("https://kms.example:7443/x").as_deref(),
        Some("kms.example")
    );
    assert_eq!(tls_name("127.0.0.1:7444").as_deref(), Some("127.0.0.1"));
    assert_eq!(tls_name("[::1]:7444").as_deref(), Some("::1"));
    assert_eq!(tls_name("https://[::1]:7443").as_deref(), Some("::1"));
    assert_eq!(tls_name("http://kms:80"), None);
    assert_eq!(
        endpoint_uri("https://kms:7443/").as_deref(),
        Some("http://kms:7443")
    );
    assert_eq!(
        endpoint_uri("127.0.0.1:7444").as_deref(),
        Some("http://127.0.0.1:7444")
    );
    assert_eq!(endpoint_uri("http://kms:80"), None);
}

/// An [`Acceptor`] on 127.0.0.1 requiring client certificates of
/// `client_ca`; answers "ok" to the first two bytes of each connection.
async fn serve_accepting(cert: &str, key: &str, client_ca: &str) -> u16 {
    let a = Acceptor::new(
        cert,
        key,
        client_ca,
        "the test client CA",
        ClientAuth::Required,
        "use a certificate of the test client CA",
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut incoming = a.incoming(listener);
    tokio::spawn(async move {
        while let Some(Ok(mut tls)) = tokio_stream::StreamExt::next(&mut incoming).await {
            tokio::spawn(async move {
                let mut b = [0u8; 2];
                if tls.read_exact(&mut b).await.is_ok() {
                    let _ = tls.write_all(b"ok").await;
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn the_acceptor_serves_clients_of_its_roots_concurrently() {
    let server_ca = ca();
    let client_ca = ca();
    let (cert, key, _) = server_leaf(&server_ca, &["127.0.0.1"]);
    let (client_cert, client_key, _) =
        leaf(&client_ca, &[], vec![ExtendedKeyUsagePurpose::ClientAuth]);
    let port = serve_accepting(&cert, &key, &client_ca.pem).await;
    let c = Connector::new(
        peer(&server_ca.pem, "127.0.0.1", None),
        Some((&client_cert, &client_key)),
    )
    .unwrap();
    // A client that never finishes its handshake holds up no one.
    let _idle = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let talks: Vec<_> = (0..8)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { talk(&c, port).await.unwrap() })
        })
        .collect();
    for t in talks {
        assert_eq!(t.await.unwrap(), "ok");
    }
}

/// A client whose certificate the server refuses reads the alert that
/// says so, even when it went on sending after its side of the handshake
/// (TLS 1.3: as an HTTP/2 client does). Dropping the connection at once
/// (tonic's acceptor) makes the kernel reset it, and such a client saw a
/// broken pipe instead, often.
#[tokio::test]
async fn a_refused_client_reads_the_alert_even_after_it_sent_requests() {
    let server_ca = ca();
    let client_ca = ca();
    let other_ca = ca();
    let (cert, key, _) = server_leaf(&server_ca, &["127.0.0.1"]);
    let (client_cert, client_key, _) =
        leaf(&other_ca, &[], vec![ExtendedKeyUsagePurpose::ClientAuth]);
    let port = serve_accepting(&cert, &key, &client_ca.pem).await;
    let c = Connector::new(
        peer(&server_ca.pem, "127.0.0.1", None),
        Some((&client_cert, &client_key)),
    )
    .unwrap();
    for _ in 0..20 {
        let mut s = c.connect("127.0.0.1", port).await.unwrap();
        // Writes after the server refused: the first reaches a closed
        // socket, the next ones its reset, if the server did not linger.
        let mut write_failed = None;
        for _ in 0..3 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            if let Err(e) = s.write_all(&[0u8; 4096]).await {
                write_failed = Some(e);
                break;
            }
        }
        assert!(
            write_failed.is_none(),
            "the server reset the connection: {write_failed:?}"
        );
        let mut b = [0u8; 2];
        let e = s.read_exact(&mut b).await.unwrap_err();
        let alert = e
            .get_ref()
            .and_then(|i| i.downcast_ref::<rustls::Error>())
            .is_some_and(|r| matches!(r, rustls::Error::AlertReceived(_)));
        assert!(alert, "not the alert: {e:?}");
    }
}

/// `probe` tells a refused client certificate from an accepted one, from
/// guestkey's acceptor and from a server that drops a refused connection at
/// once (as tonic's acceptor did).
#[tokio::test]
async fn a_probe_names_the_refusal_of_a_client_certificate() {
    let server_ca = ca();
    let client_ca = ca();
    let other_ca = named_ca("another CA");
    let (cert, key, _) = server_leaf(&server_ca, &["127.0.0.1"]);
    let (good_cert, good_key, _) = leaf(&client_ca, &[], vec![ExtendedKeyUsagePurpose::ClientAuth]);
    let (bad_cert, bad_key, _) = leaf(&other_ca, &[], vec![ExtendedKeyUsagePurpose::ClientAuth]);
    let client = |c: &str, k: &str| {
        Connector::new(peer(&server_ca.pem, "127.0.0.1", None), Some((c, k))).unwrap()
    };
    let wait = std::time::Duration::from_millis(300);
    let port = serve_accepting(&cert, &key, &client_ca.pem).await;
    let good = client(&good_cert, &good_key);
    let bad = client(&bad_cert, &bad_key);
    assert_eq!(
        good.probe("127.0.0.1", port, wait).await.unwrap(),
        Probe::Accepted
    );
    assert_eq!(
        bad.probe("127.0.0.1", port, wait).await.unwrap(),
        Probe::Refused("UnknownCA".into())
    );
    let port = serve_once(&cert, &key, Some(&client_ca.pem)).await;
    assert_eq!(
        bad.probe("127.0.0.1", port, wait).await.unwrap(),
        Probe::Refused("UnknownCA".into())
    );
}

/// The port is free as soon as the stream of connections is dropped (a
/// server stopped and started again on its port must not find it taken).
#[tokio::test]
async fn dropping_the_incoming_stream_frees_the_port() {
    let ca = ca();
    let (cert, key, _) = server_leaf(&ca, &["127.0.0.1"]);
    let a = Acceptor::new(
        &cert,
        &key,
        &ca.pem,
        "the test CA",
        ClientAuth::Optional,
        "-",
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = a.incoming(listener);
    // Polled once, as a server does before it stops.
    let _ = tokio::time::timeout(
        std::time::Duration::from_millis(20),
        tokio_stream::StreamExt::next(&mut incoming),
    )
    .await;
    drop(incoming);
    tokio::net::TcpListener::bind(addr).await.unwrap();
}
