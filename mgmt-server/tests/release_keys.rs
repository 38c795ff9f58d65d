//! `HostApi.ReleaseKeys`, the one call that delivers keys to a host on its
//! own request: only the guest's own host, with its own certificate, gets
//! them, and only through the volume's gates. The hosts are test agents
//! (stand-ins for guestkeyd, which tests/tests/approval.rs and
//! attestation.rs run for real); the server is the real one.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use common::*;
use guestkey_proto::host::{ReleaseKeysRequest, host_api_client::HostApiClient};

fn xml(name: &str) -> String {
    format!(
        "<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os><devices><disk type='volume' device='disk'><driver name='qemu' type='qcow2'/><source pool='default' volume='gated'/><target dev='vda' bus='virtio'/></disk></devices></domain>"
    )
}

async fn ask(
    s: &TestServer,
    who: Option<(&str, &str)>,
    guest_uuid: &str,
) -> Result<guestkey_proto::host::ReleasedKeys, tonic::Status> {
    let ch = channel(s.url.clone(), &s.ca_pem(), "localhost", who)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    HostApiClient::new(ch)
        .release_keys(ReleaseKeysRequest {
            guest_uuid: guest_uuid.to_owned(),
        })
        .await
        .map(|r| r.into_inner())
}

#[test]
fn only_the_guests_own_host_gets_its_gated_keys_and_only_through_the_gate() {
    let mut s = start_server(Some("[limits]\napproval_wait_secs = 1\n"));
    let mut a = TestAgent::enroll(&s, "kvm-a");
    let mut b = TestAgent::enroll(&s, "kvm-b");
    a.serve();
    b.serve();
    s.ok(&[
        "volume",
        "create",
        "--host",
        "kvm-a",
        "--pool",
        "default",
        "--name",
        "gated",
        "--size",
        "16M",
        "--release",
        "approved",
    ]);
    let v = s.json(&["volume", "show", "gated"]);
    assert_eq!(v["release"], "approved");
    let file = s.dir.join("../g1.xml");
    std::fs::write(&file, xml("g1")).unwrap();
    s.ok(&[
        "guest",
        "define",
        "--host",
        "kvm-a",
        "--xml",
        file.to_str().unwrap(),
    ]);
    s.wait_for(20, "defined", || {
        s.json(&["guest", "show", "g1"])["pending"] == ""
    });
    let uuid = s.json(&["guest", "show", "g1"])["uuid"]
        .as_str()
        .unwrap()
        .to_owned();
    // The definition carried no packet of the gated volume.
    let defined = a
        .received
        .lock()
        .unwrap()
        .iter()
        .find_map(|r| match r {
            Received::Define {
                keys, on_demand, ..
            } => Some((keys.clone(), on_demand.clone())),
            _ => None,
        })
        .unwrap();
    assert!(defined.0.is_empty(), "{defined:?}");
    assert_eq!(defined.1, vec![v["id"].as_str().unwrap().to_owned()]);
    let released = || s.audit_count("key.released");
    let before = released();

    block_on(async {
        // Another host, with its own valid certificate: refused.
        let e = ask(&s, Some((&b.cert_pem, &b.key_pem)), &uuid)
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("belongs to host kvm-a"), "{e:?}");
        // No certificate at all: refused before anything is read.
        assert!(ask(&s, None, &uuid).await.is_err());
        // The admin's certificate is not a host's.
        let dir = s.admin_dir();
        let cert = std::fs::read_to_string(dir.join("admin.pem")).unwrap();
        let key = std::fs::read_to_string(dir.join("admin.key")).unwrap();
        let e = ask(&s, Some((&cert, &key)), &uuid).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        // Its own host, but nobody approved: the start is held, naming the
        // request.
        let e = ask(&s, Some((&a.cert_pem, &a.key_pem)), &uuid)
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(
            e.message().contains("guestkeyctl pending approve rq-"),
            "{e:?}"
        );
        // A guest the server does not know.
        let e = ask(
            &s,
            Some((&a.cert_pem, &a.key_pem)),
            "00000000-0000-4000-8000-000000000000",
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    });
    assert_eq!(released(), before, "a key went out");

    // Approved: its own host gets the key, sealed to it, once.
    let list = s.json(&["pending", "list"]);
    let id = list[0]["id"].as_str().unwrap().to_owned();
    s.ok(&["pending", "approve", &id]);
    let got = block_on(ask(&s, Some((&a.cert_pem, &a.key_pem)), &uuid)).unwrap();
    assert_eq!(got.keys.len(), 1);
    let k = &got.keys[0];
    let vid = xdr_wipe::packet::VolumeId(uuid::Uuid::parse_str(&k.volume_id).unwrap());
    let host = xdr_wipe::XdrString::new("kvm-a".to_owned()).unwrap();
    xdr_wipe::seal::open(&k.sealed_packet, &a.sealing, &host, vid, k.generation).unwrap();
    assert_eq!(released(), before + 1);
    // The approval opened that one release.
    let e = block_on(ask(&s, Some((&a.cert_pem, &a.key_pem)), &uuid)).unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(!e.message().contains(&id), "the used approval again: {e:?}");
    a.stop_serving();
    b.stop_serving();
    s.stop();
}
