//! Attacks from the host: an unprivileged user (gkh1, made by
//! scripts/setup, in group kvm) who can write a shared, group-writable pool
//! directory plants and races symbolic links where guestkeyd (root)
//! creates, re-encrypts, wipes and deletes volumes; and a second guestkeyd
//! that would take over the first one's hook socket. Every attacker loop
//! is bounded in count.

#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use guestkey_tests::image::{pattern_intact, qemu_io};
use guestkey_tests::stack::{Stack, bin};
use guestkey_tests::{unique_name, virsh};

/// A root-owned file outside the pool that the attacker points links at;
/// what it must still be afterwards.
struct Victim {
    path: PathBuf,
    content: Vec<u8>,
    meta: (u32, u32, u32, u64),
}

impl Victim {
    fn new(dir: &Path) -> Self {
        let path = dir.join("victim");
        // Generated, not a literal: a search for it finds only the file.
        let content: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let meta = Self::meta_of(&path);
        Self {
            path,
            content,
            meta,
        }
    }

    fn meta_of(p: &Path) -> (u32, u32, u32, u64) {
        let m = std::fs::symlink_metadata(p).unwrap();
        (m.uid(), m.gid(), m.mode(), m.ino())
    }

    fn check(&self, after: &str) {
        assert_eq!(
            Self::meta_of(&self.path),
            self.meta,
            "after {after}: the victim's owner, mode or inode changed"
        );
        assert_eq!(
            std::fs::read(&self.path).unwrap(),
            self.content,
            "after {after}: the victim was written"
        );
    }
}

/// `sh -c SCRIPT` as gkh1 (group kvm), started now.
fn as_attacker(script: &str) -> Child {
    Command::new("runuser")
        .args(["-u", "gkh1", "--", "sh", "-c", script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn attacker_done(mut c: Child) {
    let st = c.wait().unwrap();
    assert!(st.code().is_some(), "the attacker loop was killed: {st:?}");
}

/// A pool in a directory root:kvm 0770 (shared storage, group-writable).
fn shared_pool(s: &mut Stack) -> (String, PathBuf) {
    let name = unique_name("shared");
    let dir = s.dir.join("shared-pool");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(0), Some(kvm_gid())).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770)).unwrap();
    virsh(&[
        "pool-create-as",
        &name,
        "dir",
        "--target",
        dir.to_str().unwrap(),
    ])
    .unwrap();
    s.cleanup.virsh(&["pool-destroy", &name]);
    (name, dir)
}

fn kvm_gid() -> u32 {
    guestkey_tests::run("getent", &["group", "kvm"])
        .unwrap()
        .split(':')
        .nth(2)
        .and_then(|g| g.trim().parse().ok())
        .unwrap()
}

fn create(s: &Stack, pool: &str, name: &str, timeout: &str) -> std::process::Output {
    let host = s.host.as_str();
    s.ctl(&[
        "volume",
        "create",
        "--host",
        host,
        "--pool",
        pool,
        "--name",
        name,
        "--size",
        "16M",
        "--timeout",
        timeout,
    ])
}

/// Waits until volume `name`'s last error mentions `what`; returns it.
fn refused_with(s: &Stack, name: &str, what: &str) -> String {
    let mut seen = String::new();
    s.wait_for(60, &format!("volume {name} refused with {what:?}"), || {
        seen = s.json(&["volume", "show", name])["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        seen.contains(what)
    });
    seen
}

#[test]
fn links_planted_or_raced_in_a_shared_pool_never_reach_root_files() {
    let mut s = Stack::start();
    let (pool, dir) = shared_pool(&mut s);
    let victim = Victim::new(&s.dir);
    let v = victim.path.display().to_string();
    let p = dir.display().to_string();

    // 1. A link planted where a volume is to be made: refused, nothing
    //    written through it.
    let planted = dir.join("plant-a");
    let c = as_attacker(&format!("ln -s {v} {p}/plant-a"));
    attacker_done(c);
    assert!(
        std::fs::symlink_metadata(&planted)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let out = create(&s, &pool, "plant-a", "8s");
    assert!(!out.status.success(), "a volume was made on a planted link");
    println!(
        "planted link: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    victim.check("a create on a planted link");
    assert!(
        std::fs::symlink_metadata(&planted)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let _ = s.ctl(&["volume", "delete", "plant-a"]);

    // 2. Links raced in and out of the name while the volume is made.
    //    (The attacker removes only its own links: a pool's writer can
    //    always delete an image, which is not what is tested here. An
    //    attacker loop that removed whatever had the name, or moved its
    //    copy back over it, sometimes deleted the image guestkeyd had
    //    just put there.)
    let c = as_attacker(&format!(
        "i=0; while [ $i -lt 4000 ]; do ln -s {v} {p}/race-b 2>/dev/null && [ -L {p}/race-b ] && rm -f {p}/race-b; i=$((i+1)); done"
    ));
    let out = create(&s, &pool, "race-b", "60s");
    attacker_done(c);
    victim.check("a create raced with links");
    let made = dir.join("race-b");
    if out.status.success() {
        let m = std::fs::symlink_metadata(&made).unwrap();
        assert!(m.file_type().is_file(), "the volume is a regular file");
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o777),
            (0, kvm_gid(), 0o660),
            "owned like the pool"
        );
    } else {
        println!(
            "raced create refused: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }

    // 3. A real volume with data; the attacker swaps links in for it, and
    //    for the staging directory, while it is re-encrypted (deep, then
    //    shallow).
    let vol = s.json(&[
        "volume", "create", "--host", &s.host, "--pool", &pool, "--name", "rek-c", "--size", "16M",
    ]);
    let id = vol["id"].as_str().unwrap().to_owned();
    let img = dir.join("rek-c");
    qemu_io(
        &s.dir,
        &img,
        s.server_key(&id).expose_secret(),
        "write -P 0x5c 0 4M",
    )
    .unwrap();
    // The image itself replaced by a link, and then the staging directory:
    // each refused with a message naming it; once they are back, the rekey
    // completes.
    let c = as_attacker(&format!("mv {p}/rek-c {p}/rek-c.x && ln -s {v} {p}/rek-c"));
    attacker_done(c);
    s.json(&["volume", "rekey", "rek-c", "--deep"]);
    println!(
        "image swapped for a link: {}",
        refused_with(&s, "rek-c", "symbolic link")
    );
    victim.check("a rekey of an image swapped for a link");
    let c = as_attacker(&format!(
        "rmdir {p}/.guestkey 2>/dev/null; ln -s {p}/.. {p}/.guestkey && rm {p}/rek-c && mv {p}/rek-c.x {p}/rek-c"
    ));
    attacker_done(c);
    println!(
        "staging directory swapped for a link: {}",
        refused_with(&s, "rek-c", ".guestkey")
    );
    let c = as_attacker(&format!("rm {p}/.guestkey"));
    attacker_done(c);
    s.wait_for(120, "the rekey completes", || {
        s.json(&["volume", "show", "rek-c"])["state"] == "ready"
    });
    pattern_intact(&s.dir, &img, s.server_key(&id).expose_secret(), 0x5c, "4M").unwrap();
    for kind in ["--deep", "--shallow"] {
        let c = as_attacker(&format!(
            "i=0; while [ $i -lt 1500 ]; do \
               if mv {p}/rek-c {p}/rek-c.x 2>/dev/null; then ln -s {v} {p}/rek-c 2>/dev/null && [ -L {p}/rek-c ] && rm -f {p}/rek-c; mv -n {p}/rek-c.x {p}/rek-c; fi; \
               rmdir {p}/.guestkey 2>/dev/null && ln -s {v} {p}/.guestkey && rm -f {p}/.guestkey; \
               ln -s {v} {p}/.guestkey/rek-c 2>/dev/null; \
               i=$((i+1)); done"
        ));
        let out = s.ctl(&["volume", "rekey", "rek-c", kind, "--wait"]);
        attacker_done(c);
        victim.check(&format!("a {kind} rekey raced with links"));
        println!(
            "{kind} rekey under attack: ok {}: {}",
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        // Whatever was refused is retried by the server; once the attacker
        // stops, the rekey completes and the data is intact.
        s.wait_for(180, "the rekey completes", || {
            s.json(&["volume", "show", "rek-c"])["state"] == "ready"
        });
        let m = std::fs::symlink_metadata(&img).unwrap();
        assert!(m.file_type().is_file());
        pattern_intact(&s.dir, &img, s.server_key(&id).expose_secret(), 0x5c, "4M").unwrap();
        victim.check(&format!("after the {kind} rekey completed"));
    }

    // 4. The volume replaced by a link just before it is deleted: the link
    //    goes, the victim stays.
    let c = as_attacker(&format!(
        "mv {p}/rek-c {p}/rek-c.moved && ln -s {v} {p}/rek-c"
    ));
    attacker_done(c);
    let out = s.ctl(&["volume", "delete", "rek-c"]);
    println!(
        "delete of a swapped-in link: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    s.wait_for(60, "the delete completes", || {
        s.json(&["volume", "show", &id])["state"] == "deleted"
    });
    victim.check("a delete of a swapped-in link");
    assert!(
        std::fs::symlink_metadata(&img).is_err(),
        "the link was removed"
    );
    assert!(std::fs::metadata(&victim.path).is_ok());
}

#[test]
fn a_second_guestkeyd_is_refused_and_the_first_keeps_serving() {
    let s = Stack::start();
    let first = s.daemon.as_ref().unwrap().pid();
    let other_state = s.dir.join("second-state");
    std::fs::create_dir_all(&other_state).unwrap();
    // The same hook socket as the running one (the default), and then the
    // same state directory with another socket.
    for args in [
        vec![
            "run".to_owned(),
            "--state-dir".into(),
            s.state_dir().display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--hook-socket".into(),
            s.dir.join("other.sock").display().to_string(),
        ],
        vec![
            "run".to_owned(),
            "--state-dir".into(),
            other_state.display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ],
    ] {
        let out = Command::new(bin("guestkeyd")).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a second guestkeyd started: {err}");
        assert!(
            err.contains(&format!("another guestkeyd (pid {first}) already serves")),
            "{err}"
        );
    }
    // The first still serves the hook socket.
    let mut c = std::os::unix::net::UnixStream::connect("/run/guestkey/hook.sock").unwrap();
    std::io::Write::write_all(
        &mut c,
        format!("release {}\n", uuid::Uuid::new_v4()).as_bytes(),
    )
    .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut c, &mut answer).unwrap();
    assert_eq!(answer.trim(), "ok");
}

/// A guest not defined through guestkey whose disk is a LUKS image this
/// host holds no key for: the hook refuses it before libvirt would fail
/// with "Secret not found", naming the disk, and, where the server knows
/// the volume, the host that holds its key and the command to run.
#[test]
fn a_luks_disk_without_its_key_is_refused_naming_the_disk_and_where_the_key_is() {
    let mut s = Stack::start();
    // An image encrypted outside guestkey; its secret is not in libvirt.
    let img = s.dir.join("pool/outside.qcow2");
    let kf = s.dir.join("outside.key");
    std::fs::write(&kf, "outside-passphrase").unwrap();
    let obj = format!("secret,id=k0,file={}", kf.display());
    guestkey_tests::retry_calibration(|| {
        guestkey_tests::run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "--object",
                &obj,
                "-o",
                "encrypt.format=luks,encrypt.key-secret=k0,encrypt.iter-time=10",
                img.to_str().unwrap(),
                "16M",
            ],
        )
    })
    .unwrap();
    let define = |s: &mut Stack, name: &str, path: &Path, secret: &str| {
        let enc = format!(
            "<encryption format='luks'><secret type='passphrase' uuid='{secret}'/></encryption>"
        );
        let file = s.dir.join(format!("{name}.xml"));
        std::fs::write(
            &file,
            guestkey_tests::minimal_domain_xml(name, path, "qcow2", &enc),
        )
        .unwrap();
        virsh(&["define", file.to_str().unwrap()]).unwrap();
        s.cleanup.virsh(&["undefine", name]);
        s.cleanup.virsh(&["destroy", name]);
    };
    let secret = uuid::Uuid::new_v4().to_string();
    let guest = unique_name("outside");
    define(&mut s, &guest, &img, &secret);
    let err = virsh(&["start", &guest]).unwrap_err().0;
    assert!(
        err.contains(&format!("disk vda ({}) is LUKS-encrypted with libvirt secret {secret}, which is not defined on this host", img.display())),
        "{err}"
    );
    assert!(err.contains("guestkeyctl volume encrypt"), "{err}");
    assert!(
        !err.contains("Secret not found"),
        "libvirt's words came first: {err}"
    );

    // A guestkey volume of another host, under its own secret.
    let (host2, _, _daemon2) = s.second_host();
    let pool = s.pool.clone();
    s.json(&[
        "volume",
        "create",
        "--host",
        &host2,
        "--pool",
        &pool,
        "--name",
        "other-disk",
        "--size",
        "16M",
    ]);
    let v = s.json(&["volume", "show", "other-disk"]);
    let path = s.dir.join("pool/other-disk");
    let guest2 = unique_name("other");
    define(&mut s, &guest2, &path, v["secret_uuid"].as_str().unwrap());
    let err = virsh(&["start", &guest2]).unwrap_err().0;
    assert!(
        err.contains(&format!(
            "guestkey volume other-disk (ready), whose key goes to host {host2} only"
        )),
        "{err}"
    );
    assert!(err.contains("guestkeyctl guest migrate"), "{err}");
    assert_eq!(virsh(&["domstate", &guest2]).unwrap().trim(), "shut off");
}
