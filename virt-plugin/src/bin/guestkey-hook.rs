//! `guestkey-hook`: libvirt qemu hook. libvirt runs it as
//! `guestkey-hook DOMAIN OPERATION SUB-OPERATION EXTRA` with the domain XML
//! on stdin. A non-zero exit on `prepare` stops the start, and libvirt shows
//! our stderr to the virsh user.

#![allow(clippy::print_stderr, clippy::print_stdout)] // libvirt shows the hook's stderr to the user

use std::io::Read;
use std::path::PathBuf;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    const USAGE: &str = "usage: guestkey-hook DOMAIN OPERATION SUB-OPERATION EXTRA (run by libvirt, domain XML on stdin)";
    // Only alone: libvirt always passes four arguments, whatever the
    // domain's name.
    if args.len() == 2 && matches!(args[1].as_str(), "--help" | "-h") {
        println!(
            "{USAGE}\n\nlibvirt's qemu hook of guestkey: asks guestkeyd for the keys of a guest's\nencrypted disks when it starts, and refuses the start naming what is missing.\nRun from /etc/libvirt/hooks/qemu.d/ (scripts/setup installs it there); see docs/host-daemon.md."
        );
        return;
    }
    let (domain, op) = match (args.get(1), args.get(2)) {
        (Some(d), Some(o)) => (d.clone(), o.clone()),
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    let (default_socket, managed) = virt_plugin::paths_for_uid(current_uid());
    let socket = std::env::var_os("GUESTKEY_HOOK_SOCKET").map_or(default_socket, PathBuf::from);
    let mut xml = String::new();
    // libvirt sends at most the domain XML; refuse to read without bound.
    let _ = std::io::stdin().take(16 << 20).read_to_string(&mut xml);
    let (code, msg) = virt_plugin::run(&domain, &op, &xml, &socket, &managed);
    if let Some(m) = msg {
        eprintln!("{m}");
    }
    std::process::exit(code);
}

/// The real user id, read from /proc (this crate forbids unsafe code).
fn current_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        })
        .and_then(|u| u.parse().ok())
        .unwrap_or(0)
}
