//! Shared harness for guestkey's end-to-end tests.
//!
//! The tests drive the real stack on this machine (libvirtd with KVM guests,
//! qemu-img; later cryptsetup, swtpm, PostgreSQL), set up by `scripts/setup`.
//! They observe it the way an operator would, through `virsh` and
//! `qemu-img`, so that what they check is what a libvirt user sees.
//!
//! Every object a test creates carries a unique `gk-test-` name and is
//! removed when its [`Cleanup`] guard drops, also when the test fails.

#![forbid(unsafe_code)]

pub mod image;
pub mod impostor;
pub mod leftovers;
#[path = "../../mgmt-server/tests/common/legacy.rs"]
pub mod legacy;
pub mod memscan;
pub mod migration;
pub mod stack;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// The libvirt URI the tests use.
pub const LIBVIRT_URI: &str = "qemu:///system";

pub use guestkey_testkit::{CommandFailed, run};

/// Runs `f` again while it fails because qemu-img's PBKDF calibration
/// failed (it creates or amends a LUKS keyslot, also when libvirt runs it),
/// as often as guestkeyd itself tries: see
/// [`host_daemon::image::CALIBRATION_TRIES`] for why this is frequent.
pub fn retry_calibration<T>(
    mut f: impl FnMut() -> Result<T, CommandFailed>,
) -> Result<T, CommandFailed> {
    let mut tries = 0;
    loop {
        tries += 1;
        match f() {
            Err(e)
                if tries < host_daemon::image::CALIBRATION_TRIES
                    && e.0.contains(host_daemon::image::CALIBRATION_FAILED) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Runs `virsh -c qemu:///system ARGS`.
pub fn virsh(args: &[&str]) -> Result<String, CommandFailed> {
    let mut all = vec!["-c", LIBVIRT_URI];
    all.extend_from_slice(args);
    run("virsh", &all)
}

/// Fails with an actionable message unless libvirtd answers and offers KVM.
pub fn require_libvirt() {
    let caps = virsh(&["capabilities"]).unwrap_or_else(|e| {
        panic!(
            "libvirtd is not reachable at {LIBVIRT_URI}: {e}\nRun scripts/setup (as root) first."
        )
    });
    assert!(
        caps.contains("<domain type='kvm'"),
        "libvirt offers no KVM domains: check /dev/kvm and run scripts/setup"
    );
}

/// A unique name for a test object: `gk-test-<pid>-<n>-<what>`.
pub fn unique_name(what: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "gk-test-{}-{}-{what}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Undoes what a test created, in reverse order, when dropped, and also
/// when the test process gets SIGINT, SIGTERM or SIGHUP (each step is a
/// [`guestkey_testkit::cleanup::Made`]).
#[derive(Default)]
pub struct Cleanup {
    steps: Vec<guestkey_testkit::cleanup::Made>,
}

impl Cleanup {
    /// Registers an undo step.
    pub fn push(&mut self, step: impl FnOnce() + Send + 'static) {
        self.steps.push(guestkey_testkit::cleanup::Made::new(
            "a test's undo step",
            move || {
                step();
                Ok(())
            },
        ));
    }

    /// Registers `virsh ARGS` as an undo step (its failure is ignored: the
    /// object may already be gone).
    pub fn virsh(&mut self, args: &[&str]) {
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        self.push(move || {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let _ = virsh(&refs);
        });
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        while let Some(step) = self.steps.pop() {
            drop(step);
        }
    }
}

/// A scratch directory for images, removed by the [`Cleanup`] it is
/// registered with.
pub fn scratch_dir(cleanup: &mut Cleanup, name: &str) -> PathBuf {
    let dir = Path::new("/var/lib/guestkey-tests").join(name);
    std::fs::create_dir_all(&dir).expect("create /var/lib/guestkey-tests (run the tests as root)");
    let d = dir.clone();
    cleanup.push(move || {
        let _ = std::fs::remove_dir_all(&d);
    });
    dir
}

/// Domain XML of a minimal KVM guest (64 MiB, no OS: it waits in the
/// firmware) with one virtio disk described by `disk` (the inside of
/// `<disk>`), and `extra` devices.
fn domain_with_disk(name: &str, kind: &str, disk: &str, extra: &str) -> String {
    format!(
        "<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='{kind}' device='disk'>
{disk}
      <target dev='vda' bus='virtio'/>
    </disk>{extra}
  </devices>
</domain>
"
    )
}

/// A minimal guest (no display) whose disk is volume `volume` of libvirt
/// pool `pool`, `driver` qcow2 or raw.
pub fn volume_domain_xml(name: &str, pool: &str, volume: &str, driver: &str) -> String {
    domain_with_disk(
        name,
        "volume",
        &format!(
            "      <driver name='qemu' type='{driver}'/>\n      <source pool='{pool}' volume='{volume}'/>"
        ),
        "",
    )
}

/// A minimal guest (VNC on 127.0.0.1) whose disk is the file `disk_path`;
/// `encryption` is the disk's `<encryption>` element, or empty.
pub fn minimal_domain_xml(name: &str, disk_path: &Path, format: &str, encryption: &str) -> String {
    domain_with_disk(
        name,
        "file",
        &format!(
            "      <driver name='qemu' type='{format}'/>\n      <source file='{}'/>\n      {encryption}",
            disk_path.display()
        ),
        "\n    <graphics type='vnc' listen='127.0.0.1' autoport='yes'/>",
    )
}
