//! Benchmark: what TPM sealing costs, against the file protectors in the
//! same run (a TPM simulator, swtpm, started by the benchmark; a hardware
//! TPM is slower still: its commands take milliseconds).
//!
//! 1. Unsealing a key at start-up: `TpmProtector::unseal` (PCR read, the
//!    PolicyPCR + PolicyAuthorize session, TPM2_Unseal, unwrap) against
//!    `FileProtector::unseal` of the same key.
//! 2. Key generation: keys/s with TPM random bytes mixed in (HKDF over OS
//!    and TPM bytes) against the OS generator alone.
//!
//! `cargo bench -p guestkey-protect --bench tpm` (`-- --quick`: fewer rounds).

#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

use std::time::{Duration, Instant};

use guestkey_protect::tpm::{
    Approvals, Authority, Entropy, PcrSelection, TpmProtector, current_pcrs,
};
use guestkey_protect::{Encoding, FileProtector, KeyProtector, ProtectedKey};
use guestkey_testkit::{Swtpm, temp_dir};

fn per_second(n: u32, d: Duration) -> f64 {
    f64::from(n) / d.as_secs_f64()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds: u32 = if quick { 20 } else { 100 };
    let tpm = Swtpm::start();
    let dir = temp_dir("bench-tpm");
    // Removed at the end, on a panic, and on Ctrl-C (SIGINT/SIGTERM/SIGHUP).
    let _made = guestkey_testkit::cleanup::Made::dir(&dir);
    let pcrs: PcrSelection = "sha256:7".parse().unwrap();
    let authority = Authority::create(&dir.join("authority.pk8")).unwrap();
    let sealed = TpmProtector::new(
        dir.join("k.tpm"),
        dir.join("approvals.json"),
        &tpm.tcti(),
        "-",
    )
    .sealing_to(authority.public(), pcrs.clone());
    let file = FileProtector::new(dir.join("k.key"), Encoding::Raw);
    let key = ProtectedKey::random(32).unwrap();
    sealed.create(&key).unwrap();
    file.create(&key).unwrap();
    let now = current_pcrs(&tpm.tcti(), &pcrs).unwrap();
    Approvals::add_and_save(
        &dir.join("approvals.json"),
        authority.approve(now, "bench").unwrap(),
    )
    .unwrap();

    // 1. Unseal.
    let t = Instant::now();
    for _ in 0..rounds {
        assert_eq!(file.unseal().unwrap().len(), 32);
    }
    let file_t = t.elapsed();
    let t = Instant::now();
    for _ in 0..rounds {
        assert_eq!(sealed.unseal().unwrap().len(), 32);
    }
    let tpm_t = t.elapsed();
    let per = |d: Duration| d.as_secs_f64() * 1000.0 / f64::from(rounds);
    println!(
        "unseal: file {:.3} ms, TPM {:.2} ms per key ({:.0}x the file), {rounds} rounds",
        per(file_t),
        per(tpm_t),
        tpm_t.as_secs_f64() / file_t.as_secs_f64()
    );

    // 2. Key generation.
    let n = rounds * 10;
    let os = Entropy::os_only();
    let mixed = Entropy::with_tpm(&tpm.tcti()).unwrap();
    let t = Instant::now();
    for _ in 0..n {
        assert_eq!(os.key(32).unwrap().len(), 32);
    }
    let os_rate = per_second(n, t.elapsed());
    let t = Instant::now();
    for _ in 0..n {
        assert_eq!(mixed.key(32).unwrap().len(), 32);
    }
    let mixed_rate = per_second(n, t.elapsed());
    println!(
        "key generation: OS alone {os_rate:.0} keys/s, with TPM bytes mixed in {mixed_rate:.0} keys/s (ratio {:.4}), {n} keys",
        mixed_rate / os_rate
    );
}
