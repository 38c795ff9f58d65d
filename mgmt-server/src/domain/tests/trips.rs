//! How many database round trips the hot paths make: deterministic
//! counts, so that a change that multiplies them (a query in a loop, a
//! look-up per row) fails here instead of passing silently into a
//! slower benchmark (issue 16). On both engines.

use super::Bed;
use crate::store::StoreStats;

/// Round trips of `f`.
async fn trips<F: std::future::Future>(b: &Bed, f: F) -> u64 {
    let before: StoreStats = b.core.store_stats();
    f.await;
    b.core.store_stats().since(before).round_trips
}

#[tokio::test]
async fn a_push_round_costs_a_fixed_number_of_round_trips_plus_a_few_per_key() {
    let b = Bed::new();
    b.host("kvm-1");
    let create = |n: usize, from: usize| {
        for i in from..from + n {
            b.core
                .create_volume(
                    &b.admin,
                    "kvm-1",
                    "default",
                    &format!("v{i}"),
                    1 << 20,
                    crate::model::VolumeFormat::Qcow2,
                )
                .unwrap();
        }
    };
    create(1, 0);
    let one = trips(&b, async { b.core.push_volumes().await.unwrap() }).await;
    create(21, 1);
    let many = trips(&b, async { b.core.push_volumes().await.unwrap() }).await;
    eprintln!("one key: {one} round trips; 21 keys: {many}");
    assert!(b.core.due_volumes(100).unwrap().is_empty(), "all pushed");
    // A round: the due volumes and their hosts (one read), one transaction that
    // releases every key (the host read once, `meta` read once and the
    // audit head written once, with the commit), one that records
    // every outcome. Each key more: its policy and wrapped key (one
    // query), its `key.released` record, its state check and update, its
    // `volume.ready` record. (PostgreSQL adds the first preparation of a
    // statement on a connection.)
    assert!(one <= 20, "one key cost {one} round trips (20 at most)");
    assert!(
        many - one <= 20 * 5,
        "20 keys more cost {} round trips (5 a key at most)",
        many - one
    );
    // On PostgreSQL the writes whose row counts nobody reads (the audit
    // records, the state updates) go with the next statement or the
    // commit: a key costs its release query and its state check.
    if matches!(
        b.store.as_ref(),
        crate::store::testing::TestStore::Postgres { .. }
    ) {
        assert!(
            many - one <= 20 * 2,
            "on PostgreSQL 20 keys more cost {} round trips (2 a key at most)",
            many - one
        );
    }
    // The audit head written at commit is the chain's end.
    assert!(
        b.core.verify_audit(None).unwrap().ok,
        "the audit chain verifies"
    );
}
