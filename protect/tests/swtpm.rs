//! TPM sealing against a real TPM 2.0 implementation: `swtpm`, one
//! simulator per test (the only stand-in, and an acceptable one: a test
//! cannot extend, clear or copy a real TPM), through the real tss-esapi
//! calls.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use guestkey_protect::tpm::{
    Approvals, Authority, Entropy, PcrSelection, PcrValue, TpmProtector, current_pcrs,
};
use guestkey_protect::{KeyProtector, ProtectError, ProtectedKey};
use guestkey_testkit::cleanup::Made;
use guestkey_testkit::{Swtpm, temp_dir};

const HINT: &str = "guestkey-server tpm approve --current";

struct Machine {
    tpm: Swtpm,
    dir: std::path::PathBuf,
    authority: Authority,
}

impl Machine {
    fn new() -> Self {
        let dir = temp_dir("tpm");
        let authority = Authority::create(&dir.join("authority.pk8")).unwrap();
        Self {
            tpm: Swtpm::start(),
            dir,
            authority,
        }
    }

    fn approvals(&self) -> std::path::PathBuf {
        self.dir.join("approvals.json")
    }

    fn protector(&self, name: &str) -> TpmProtector {
        TpmProtector::new(
            self.dir.join(name),
            self.approvals(),
            &self.tpm.tcti(),
            HINT,
        )
        .sealing_to(self.authority.public(), pcr7())
        .with_deadline(Duration::from_secs(20))
    }

    /// Approves the PCR values the TPM has now.
    fn approve_current(&self, note: &str) {
        let now = current_pcrs(&self.tpm.tcti(), &pcr7()).unwrap();
        Approvals::add_and_save(
            &self.approvals(),
            self.authority.approve(now, note).unwrap(),
        )
        .unwrap();
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pcr7() -> PcrSelection {
    "sha256:7".parse().unwrap()
}

fn message(e: ProtectError) -> String {
    e.to_string()
}

#[test]
fn a_key_sealed_to_the_tpm_unseals_with_an_approval_of_the_current_pcrs_only() {
    let m = Machine::new();
    let p = m.protector("master.key.tpm");
    let key = ProtectedKey::random(32).unwrap();
    p.create(&key).unwrap();
    assert!(p.exists().unwrap());
    // The file holds no key bytes.
    let file = std::fs::read(p.blob()).unwrap();
    assert!(
        !file.windows(32).any(|w| w == key.expose_secret()),
        "the key is in the sealed file"
    );
    // No approval yet: refused, naming the file and the command.
    let e = message(p.unseal().unwrap_err());
    assert!(e.contains("has no PCR approval of authority"), "{e}");
    assert!(e.contains(HINT), "{e}");
    m.approve_current("initial");
    assert_eq!(p.unseal().unwrap().expose_secret(), key.expose_secret());
    // A second create is refused and changes nothing.
    let e = message(p.create(&ProtectedKey::random(32).unwrap()).unwrap_err());
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(p.unseal().unwrap().expose_secret(), key.expose_secret());
    // Keys longer than the TPM seals (a PEM CA key) are sealed too.
    let pem = ProtectedKey::random(1200).unwrap();
    let ca = m.protector("ca.key.tpm");
    ca.create(&pem).unwrap();
    assert_eq!(ca.unseal().unwrap().expose_secret(), pem.expose_secret());
    // A reboot resets the PCRs to the same values: still unseals.
    let mut m = m;
    m.tpm.reboot();
    assert_eq!(p.unseal().unwrap().expose_secret(), key.expose_secret());
    // replace() rotates it.
    let next = ProtectedKey::random(32).unwrap();
    p.replace(&next).unwrap();
    assert_eq!(p.unseal().unwrap().expose_secret(), next.expose_secret());
}

#[test]
fn an_update_changes_a_pcr_and_a_signed_approval_lets_the_same_sealed_key_unseal() {
    let m = Machine::new();
    let p = m.protector("store.key.tpm");
    let key = ProtectedKey::random(32).unwrap();
    p.create(&key).unwrap();
    m.approve_current("before the update");
    let before = std::fs::read(p.blob()).unwrap();

    // The update: its bootloader measures something new into PCR 7.
    m.tpm.extend(7, b"a new Secure Boot db entry");
    let e = message(p.unseal().unwrap_err());
    assert!(e.contains("PCR 7 is "), "{e}");
    assert!(
        e.contains("no approved PCR policy matches this boot"),
        "{e}"
    );
    assert!(e.contains(HINT), "{e}");
    // Refusing changed nothing.
    assert_eq!(std::fs::read(p.blob()).unwrap(), before);

    // The operator approves the new values; the key unseals without being
    // sealed again.
    m.approve_current("after the update");
    assert_eq!(p.unseal().unwrap().expose_secret(), key.expose_secret());
    assert_eq!(std::fs::read(p.blob()).unwrap(), before);
}

#[test]
fn an_update_approved_in_advance_unseals_after_its_reboot() {
    let m = Machine::new();
    let p = m.protector("store.key.tpm");
    let key = ProtectedKey::random(32).unwrap();
    p.create(&key).unwrap();
    m.approve_current("now");
    // The approver computes PCR 7 after the update from the measurement the
    // update adds, and signs it before the machine boots it.
    let now = current_pcrs(&m.tpm.tcti(), &pcr7()).unwrap();
    let measurement: [u8; 32] = {
        use sha2::Digest;
        sha2::Sha256::digest(b"shim 15.8").into()
    };
    let expected = now
        .clone()
        .with(7, now.get(7).unwrap().extended(&measurement));
    let a = m.authority.approve(expected, "shim 15.8").unwrap();
    Approvals::add_and_save(&m.approvals(), a).unwrap();
    // The update's boot.
    m.tpm.extend(7, b"shim 15.8");
    assert_eq!(p.unseal().unwrap().expose_secret(), key.expose_secret());
}

#[test]
fn approvals_of_another_authority_or_altered_ones_do_not_open_the_key() {
    let m = Machine::new();
    let p = m.protector("store.key.tpm");
    p.create(&ProtectedKey::random(32).unwrap()).unwrap();
    let now = current_pcrs(&m.tpm.tcti(), &pcr7()).unwrap();
    // Someone else's authority: not even tried.
    let other = Authority::create(&m.dir.join("other.pk8")).unwrap();
    Approvals::add_and_save(&m.approvals(), other.approve(now.clone(), "x").unwrap()).unwrap();
    let e = message(p.unseal().unwrap_err());
    assert!(e.contains("has no PCR approval of authority"), "{e}");
    // Its approval relabelled as ours: the TPM refuses the signature.
    let mut forged = other.approve(now.clone(), "forged").unwrap();
    forged.authority = m.authority.public().fingerprint();
    Approvals::add_and_save(&m.approvals(), forged).unwrap();
    let e = message(p.unseal().unwrap_err());
    assert!(
        e.contains("does not verify with the PCR authority key"),
        "{e}"
    );
    // Our approval with other PCR values swapped in: refused too.
    let mut edited = m
        .authority
        .approve(now.clone().with(7, PcrValue([9; 32])), "x")
        .unwrap();
    edited.values = now;
    let all = Approvals {
        approvals: vec![edited],
    };
    all.save(&m.approvals()).unwrap();
    let e = message(p.unseal().unwrap_err());
    assert!(e.contains("does not verify"), "{e}");
}

#[test]
fn a_copy_on_another_tpm_or_after_a_clear_opens_nothing_and_says_so() {
    let m = Machine::new();
    let p = m.protector("store.key.tpm");
    let key = ProtectedKey::random(32).unwrap();
    p.create(&key).unwrap();
    m.approve_current("here");

    // The state directory copied to a second machine with its own TPM (and
    // the same PCR values, so only the TPM differs).
    let other = Swtpm::start();
    let copy = TpmProtector::new(p.blob(), m.approvals(), &other.tcti(), HINT)
        .with_deadline(Duration::from_secs(20));
    let e = message(copy.unseal().unwrap_err());
    assert!(
        e.contains("sealed by another TPM, or this TPM was cleared"),
        "{e}"
    );

    // The TPM's owner cleared it (new storage seed).
    m.tpm.tool("tpm2_clear", &["-c", "p"]);
    let e = message(p.unseal().unwrap_err());
    assert!(
        e.contains("sealed by another TPM, or this TPM was cleared"),
        "{e}"
    );
}

#[test]
fn a_tpm_that_is_not_there_or_does_not_answer_is_named() {
    let dir = temp_dir("tpm");
    let _gone = Made::dir(&dir);
    let authority = Authority::create(&dir.join("a.pk8")).unwrap();
    // Nobody listens.
    let port = guestkey_testkit::free_ports(2);
    let tcti = format!("swtpm:host=127.0.0.1,port={port}");
    let p = TpmProtector::new(dir.join("k.tpm"), dir.join("ap.json"), &tcti, HINT)
        .sealing_to(authority.public(), pcr7())
        .with_deadline(Duration::from_secs(20));
    let e = message(p.create(&ProtectedKey::random(32).unwrap()).unwrap_err());
    assert!(
        e.contains(&format!("cannot open the TPM at TCTI `{tcti}`")),
        "{e}"
    );
    assert!(!p.exists().unwrap(), "a failed seal left a file");
    // Something listens and never answers.
    // (The swtpm TCTI uses PORT and PORT+1.)
    let port = guestkey_testkit::free_ports(2);
    let _silent = [
        std::net::TcpListener::bind(("127.0.0.1", port)).unwrap(),
        std::net::TcpListener::bind(("127.0.0.1", port + 1)).unwrap(),
    ];
    let tcti = format!("swtpm:host=127.0.0.1,port={port}");
    let p = TpmProtector::new(dir.join("k.tpm"), dir.join("ap.json"), &tcti, HINT)
        .sealing_to(authority.public(), pcr7())
        .with_deadline(Duration::from_secs(3));
    let e = message(p.create(&ProtectedKey::random(32).unwrap()).unwrap_err());
    assert!(e.contains("did not answer within 3 s"), "{e}");
    assert!(!p.exists().unwrap());
    // A TCTI string that is not one.
    let p = TpmProtector::new(dir.join("k.tpm"), dir.join("ap.json"), "nonsense:", HINT)
        .sealing_to(authority.public(), pcr7());
    let e = message(p.create(&ProtectedKey::random(32).unwrap()).unwrap_err());
    assert!(e.contains("is not a TCTI"), "{e}");
}

#[test]
fn damaged_files_are_named_and_nothing_is_unsealed() {
    let m = Machine::new();
    let p = m.protector("store.key.tpm");
    p.create(&ProtectedKey::random(32).unwrap()).unwrap();
    m.approve_current("x");
    let good = std::fs::read_to_string(p.blob()).unwrap();
    // The wrapped key altered.
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    let w = v["wrapped"].as_str().unwrap().to_owned();
    let flipped = format!(
        "{}{}",
        &w[..w.len() - 1],
        if w.ends_with('0') { "1" } else { "0" }
    );
    v["wrapped"] = flipped.into();
    std::fs::write(p.blob(), serde_json::to_vec(&v).unwrap()).unwrap();
    let e = message(p.unseal().unwrap_err());
    assert!(e.contains("the file was altered"), "{e}");
    // Not a sealed key at all.
    std::fs::write(p.blob(), b"hello").unwrap();
    let e = message(p.unseal().unwrap_err());
    assert!(e.contains("is not a TPM-sealed key"), "{e}");
    // The approvals file is not one.
    std::fs::write(p.blob(), &good).unwrap();
    std::fs::write(m.approvals(), b"[").unwrap();
    let e = message(p.unseal().unwrap_err());
    assert!(e.contains("is not a list of PCR approvals"), "{e}");
}

#[test]
fn keys_mix_tpm_random_bytes_in() {
    let t = Swtpm::start();
    let e = Entropy::with_tpm(&t.tcti()).unwrap();
    assert!(e.uses_tpm());
    let a = e.key(32).unwrap();
    let b = e.key(64).unwrap();
    assert_eq!(b.len(), 64);
    assert_ne!(a.expose_secret(), &b.expose_secret()[..32]);
    // The TPM gone: keys still come, from the OS generator (logged once).
    drop(t);
    assert_eq!(e.key(32).unwrap().len(), 32);
    // A TPM that is not there is refused when configured.
    let port = guestkey_testkit::free_ports(2);
    assert!(Entropy::with_tpm(&format!("swtpm:host=127.0.0.1,port={port}")).is_err());
}

#[test]
fn a_tpm_in_dictionary_attack_lockout_still_unseals_and_seals_guestkeys_keys() {
    let m = Machine::new();
    let p = m.protector("store.key.tpm");
    let key = ProtectedKey::random(32).unwrap();
    p.create(&key).unwrap();
    m.approve_current("x");
    // Someone guesses a password of another DA-protected object: with one
    // try allowed the TPM goes into lockout.
    let ctx = m.dir.join("prim.ctx");
    let ctx = ctx.to_str().unwrap();
    m.tpm.tool(
        "tpm2_dictionarylockout",
        &[
            "--setup-parameters",
            "--max-tries=1",
            "--recovery-time=600",
            "--lockout-recovery-time=600",
        ],
    );
    m.tpm.tool(
        "tpm2_createprimary",
        &["-C", "o", "-c", ctx, "-p", "right", "-Q"],
    );
    let pubf = m.dir.join("k.pub");
    let privf = m.dir.join("k.priv");
    let wrong = std::process::Command::new("tpm2_create")
        .args(["--tcti", &m.tpm.tcti(), "-C", ctx, "-P", "wrong", "-Q"])
        .args(["-u", pubf.to_str().unwrap(), "-r", privf.to_str().unwrap()])
        .env("TSS2_LOG", "all+none")
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    // (Without a resource manager the tools leave their objects loaded.)
    m.tpm.tool("tpm2_flushcontext", &["-t"]);
    let caps = m.tpm.tool("tpm2_getcap", &["properties-variable"]);
    assert!(caps.contains("inLockout:                 1"), "{caps}");
    // guestkey's objects are noDA: they unseal, and new ones seal.
    assert_eq!(p.unseal().unwrap().expose_secret(), key.expose_secret());
    let other = m.protector("other.key.tpm");
    other.create(&ProtectedKey::random(32).unwrap()).unwrap();
    assert_eq!(other.unseal().unwrap().len(), 32);
}
