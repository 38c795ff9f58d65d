//! Every statement the domain runs is answered from an index, not by
//! reading a whole large table: the query plan (SQLite's `EXPLAIN QUERY
//! PLAN`) of each statement a workload of the API's operations prepared
//! is checked, so that a new query without its index fails here instead
//! of slowing `volume show` at a million volumes (issue 16). Statements
//! whose job is to read a whole table (listings, the master key's
//! rotation, the audit chain's verification) are named below with why.

use super::Bed;
use crate::model::{RekeyKind, RekeyPlacement};
use crate::store::testing::TestStore;

/// Tables that hold one row or a handful (a scan of them is a look-up):
/// settings, the lease, the replicas, the admins, and the journal of the
/// migrations under way (a row leaves it when its migration ends).
const SMALL: [&str; 6] = [
    "meta",
    "leader_lease",
    "replicas",
    "admins",
    "schema_version",
    "guest_migrations",
];

/// Statements that read every row on purpose: a piece of each, and why.
const WHOLE: [(&str, &str); 5] = [
    (
        "FROM console_sessions ORDER BY last_ms DESC LIMIT 1 OFFSET",
        "the console session the cap keeps last: the last_ms index read newest first, at most 1,001 entries",
    ),
    (
        "(CAST($1 AS TEXT) IS NULL OR v.host = $1) ORDER BY v.name",
        "`volume list`: every volume, by name",
    ),
    (
        "(CAST($1 AS TEXT) IS NULL OR g.host = $1) ORDER BY g.host, g.name",
        "`guest list`: every guest, by host and name",
    ),
    (
        "FROM hosts h ORDER BY h.name",
        "`host list`: every host, by name",
    ),
    (
        "LEFT JOIN volumes v ON v.id = e.volume_id ORDER BY e.n DESC LIMIT 1000",
        "`escrow list --all`: every escrow request, newest first, at most 1,000",
    ),
];

#[tokio::test]
async fn every_statement_of_the_api_operations_uses_an_index() {
    let b = Bed::on_sqlite();
    b.host("kvm-a");
    b.host("kvm-b");
    let v = b.volume("kvm-a", "disk").await;
    b.volume("kvm-a", "data").await;
    let g = b.guest("kvm-a", "g1", &["disk", "data"]).await;
    // Look-ups, listings, the audit log.
    b.core.get_volume("disk").unwrap();
    b.core.get_volume(&v.id).unwrap();
    b.core.get_guest("g1").unwrap();
    b.core.get_guest(&g.uuid).unwrap();
    b.core.get_host("kvm-a").unwrap();
    b.core.list_volumes(None).unwrap();
    b.core.list_volumes(Some("kvm-a")).unwrap();
    b.core.list_hosts().unwrap();
    b.core.list_guests(None).unwrap();
    assert!(b.core.verify_audit(None).unwrap().ok);
    // Escrow packets: asked, approved, fetched, denied, listed.
    let bob = crate::model::Caller::Admin("bob".into());
    let to = || vec![age::x25519::Identity::generate().to_public().to_string()];
    let e = b.core.request_escrow(&b.admin, "disk", &to(), "").unwrap();
    b.core
        .decide_escrow(bob.clone(), e.id.clone(), true, String::new())
        .await
        .unwrap();
    b.core.get_escrow_packet(&bob, &e.id).unwrap();
    let d = b.core.request_escrow(&b.admin, "disk", &to(), "").unwrap();
    b.core
        .decide_escrow(bob.clone(), d.id, false, String::new())
        .await
        .unwrap();
    for (volume, all) in [
        (None, false),
        (None, true),
        (Some("disk"), false),
        (Some("disk"), true),
    ] {
        b.core.list_escrow(volume, all).unwrap();
    }
    // A rekey, a migration, a deletion.
    b.core
        .request_rekey(&b.admin, "data", RekeyKind::Shallow, RekeyPlacement::Any, 0)
        .unwrap();
    b.push().await;
    b.core
        .migrate_guest(b.admin.clone(), "g1".into(), "kvm-b".into(), false, false)
        .await
        .unwrap();
    b.push().await;
    b.core.apply_policies().unwrap();
    b.core.rekeys_overdue().unwrap();
    // Managed pools.
    b.agents.set_pool(
        "kvm-a",
        "default",
        crate::domain::agent::PoolDescription {
            kind: "dir".into(),
            path: "/p".into(),
            volumes: vec![crate::domain::agent::PoolVolume {
                name: "disk".into(),
                path: "/p/disk".into(),
                format: "qcow2".into(),
                image: None,
                used_by: vec![],
                base_of: vec![],
            }],
            unreadable_domains: vec![],
        },
    );
    b.core
        .manage_pool(b.admin.clone(), "kvm-a".into(), "default".into())
        .await
        .unwrap();
    b.core
        .describe_pool("kvm-a".into(), "default".into())
        .await
        .unwrap();
    b.core.list_managed_pools(Some("kvm-a")).unwrap();
    // The console's own reads.
    b.core.volume_history("disk").unwrap();
    b.core.held_keys().unwrap();
    b.core
        .set_console_user(&b.admin, "alice", "a long password")
        .unwrap();
    b.core
        .check_console_login("alice", "a long password")
        .unwrap();
    b.core.console_user_exists("alice").unwrap();
    let (_, tag) = b
        .core
        .check_console_login("alice", "a long password")
        .unwrap()
        .unwrap();
    let now = crate::domain::now_unix_ms();
    b.core
        .open_console_session(
            &crate::store::ConsoleSession {
                token_hash: vec![7; 32],
                login: "alice".into(),
                tag: tag.to_vec(),
                csrf: "c".into(),
                started_ms: now - 60_000,
                last_ms: now - 60_000,
            },
            3_600_000,
            3_600_000,
            1000,
        )
        .unwrap();
    b.core
        .console_session_check(&[7; 32], 3_600_000, 3_600_000)
        .unwrap();
    b.core.close_console_session(&[7; 32]).unwrap();
    b.core.unfinished_migrations().unwrap();
    b.volume("kvm-b", "spare").await;
    b.core.delete_volume(&b.admin, "spare").unwrap();
    b.push().await;

    let TestStore::Sqlite(store) = b.store.as_ref() else {
        unreachable!("Bed::on_sqlite")
    };
    let seen: Vec<String> = store.seen.lock().unwrap().iter().cloned().collect();
    assert!(
        seen.len() > 40,
        "the workload ran {} statements",
        seen.len()
    );
    let mut bad = vec![];
    for sql in &seen {
        let plan = store.query_plan(sql).unwrap();
        let scans: Vec<&String> = plan
            .iter()
            .filter(|line| {
                let Some(rest) = line.strip_prefix("SCAN ") else {
                    return false;
                };
                let table = rest.split_whitespace().next().unwrap_or("");
                !SMALL.contains(&table) && !rest.starts_with("CONSTANT ROW")
            })
            .collect();
        let whole = WHOLE.iter().any(|(piece, _)| sql.contains(piece));
        if !scans.is_empty() && !whole {
            bad.push(format!("{}\n    {scans:?}", one_line(sql)));
        }
    }
    assert!(
        bad.is_empty(),
        "statements that read a whole table (give them an index, or name them in WHOLE with why):\n{}",
        bad.join("\n")
    );
}

fn one_line(sql: &str) -> String {
    sql.split_whitespace().collect::<Vec<_>>().join(" ")
}
