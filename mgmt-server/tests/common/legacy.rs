//! A data directory as guestkey made it before certificates had roles, for
//! the tests of `guestkey-server migrate-roles` (here, and in the
//! end-to-end tests, which include this file).
//!
//! The code before roles (up to commit f94929c) made one CA, `ca/ca.pem`,
//! and signed with it the server certificate (`guestkey-server`, the SANs,
//! serverAuth and clientAuth), the admin certificate (`guestkey-admin`, no
//! SANs, both usages) and, at enrollment, each host's certificate; the
//! admin credential's `ca.pem` was that CA, and there was no
//! `admin/server.sha256`, `ca/server-ca.*` or `ca/admin-ca.*`. Hosts kept
//! that CA as `ca.pem` and the server certificate's hash as
//! `server.sha256`. [`make_legacy`] turns a directory made by today's
//! `init` (and used by today's server, so that it holds hosts, volumes and
//! keys) into exactly that: the hosts CA becomes the one CA, which signs a
//! new server and admin certificate; the database keeps every key and
//! host, and its admin row names the new admin certificate.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use mgmt_server::ca::{Ca, Role, cert_sha256, subject_alt_names};
use mgmt_server::datadir::DataDir;

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).expect("write a legacy file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn sha256_of(pem: &str) -> String {
    let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("a certificate");
    cert_sha256(&der.contents)
}

/// Rewrites the (stopped) server's data directory `data` into the layout
/// made before roles; returns the SHA-256 of its server certificate (what
/// hosts enrolled then pinned).
pub fn make_legacy(data: &Path) -> String {
    let dir = DataDir::new(data);
    let ca_pem = std::fs::read_to_string(dir.ca_cert()).expect("ca/ca.pem");
    let ca = Ca::load(Role::Host, &ca_pem, &dir.ca_key_source()).expect("the CA");
    let old_server = std::fs::read_to_string(dir.server_cert()).expect("tls/server.pem");
    let sans = subject_alt_names(&old_server).expect("the server's names");
    let server = ca
        .issue("guestkey-server", sans, 397)
        .expect("a server certificate");
    let admin = ca
        .issue("guestkey-admin", vec![], 397)
        .expect("an admin certificate");
    for f in [
        "server-ca.pem",
        "server-ca.key",
        "admin-ca.pem",
        "admin-ca.key",
    ] {
        std::fs::remove_file(data.join("ca").join(f)).expect("remove a role CA");
    }
    std::fs::remove_file(dir.admin_server_pin()).expect("remove admin/server.sha256");
    write(&dir.server_cert(), &server.cert, 0o644);
    write(
        &dir.server_key(),
        server.key.as_ref().expect("a key").as_str(),
        0o600,
    );
    let admin_dir = dir.admin_dir();
    write(&admin_dir.join("ca.pem"), &ca_pem, 0o644);
    write(&admin_dir.join("admin.pem"), &admin.cert, 0o644);
    write(
        &admin_dir.join("admin.key"),
        admin.key.as_ref().expect("a key").as_str(),
        0o600,
    );
    let db = rusqlite::Connection::open(dir.db()).expect("the database");
    let n = db
        .execute("UPDATE admins SET cert_sha256 = ?1", [&admin.sha256])
        .expect("the admin row");
    assert_eq!(n, 1, "one admin row");
    assert_eq!(sha256_of(&server.cert), server.sha256);
    server.sha256
}
