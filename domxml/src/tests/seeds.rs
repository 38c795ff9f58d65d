//! The fuzzing checks over the committed seeds of `domxml/fuzz` (accepted
//! vectors, refused documents, edge cases, and every crash the fuzzer
//! found, as `regression-*`), so that `cargo test` runs them without
//! cargo-fuzz.

use crate::fuzzing;

#[test]
fn fuzzing_rule_holds_on_every_seed() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/read");
    let mut accepted = 0;
    let mut refused = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let ok = std::panic::catch_unwind(|| fuzzing::check(&data))
            .unwrap_or_else(|_| panic!("the fuzzing rule breaks on seed {name}"));
        // Seeds named for what they are must still be that.
        if name.starts_with("accepted-") || name.starts_with("edge-") {
            assert!(ok, "seed {name} is refused");
        }
        if name.starts_with("refused-") {
            assert!(!ok, "seed {name} is accepted");
        }
        if ok {
            accepted += 1;
        } else {
            refused += 1;
        }
    }
    assert!(
        accepted >= 15 && refused >= 90,
        "{accepted} accepted, {refused} refused"
    );
}
