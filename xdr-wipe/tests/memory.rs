//! Memory hygiene: after sealed packets are opened and dropped, no copy of
//! their secrets is left anywhere in this process's memory.
//!
//! The secrets are generated at run time. The test keeps only masked copies
//! (each byte XOR a constant) and compares memory against them on the fly,
//! so the search never plants the needle it looks for. A scan while the
//! opened packet is still alive must find every secret: that proves the
//! scanner works, so that the final "nothing found" means something.
//!
//! No other test in this file allocates secrets (the second one runs the
//! first in a child process with a planted leak, to show it can fail).

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::fs::File;
use std::os::unix::fs::FileExt;

use xdr_wipe::SecretOpaque;
use xdr_wipe::packet::{
    CipherParams, DataKeySize, KeyPacket, Mechanism, PacketVersion, Recovery, VolumeFormat,
    VolumeId, generate_data_key, generate_passphrase,
};
use xdr_wipe::seal::{HostSealingKey, open, seal};

const MASK: u8 = 0xa5;
const FRAGMENT: usize = 16;

/// A masked search pattern and what it is a piece of.
struct Needle {
    what: String,
    masked: Vec<u8>,
}

/// The whole secret and three 16-byte fragments of it (start, middle, end),
/// so that a partial copy is found too.
fn needles(what: &str, secret: &[u8]) -> Vec<Needle> {
    let masked: Vec<u8> = secret.iter().map(|b| b ^ MASK).collect();
    let mid = secret.len() / 2 - FRAGMENT / 2;
    let mut out = vec![];
    for (part, start) in [
        ("start", 0),
        ("middle", mid),
        ("end", secret.len() - FRAGMENT),
    ] {
        out.push(Needle {
            what: format!("{what} ({part} fragment)"),
            masked: masked[start..start + FRAGMENT].to_vec(),
        });
    }
    out.push(Needle {
        what: format!("{what} (whole)"),
        masked,
    });
    out
}

/// Counts where each needle occurs in this process's readable memory.
fn scan(needles: &[Needle]) -> Vec<Vec<String>> {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    let mem =
        File::open("/proc/self/mem").expect("open /proc/self/mem (needs root or ptrace rights)");
    // first (unmasked) byte -> needles starting with it
    let mut by_first: Vec<Vec<usize>> = vec![vec![]; 256];
    for (i, n) in needles.iter().enumerate() {
        by_first[usize::from(n.masked[0] ^ MASK)].push(i);
    }
    let longest = needles.iter().map(|n| n.masked.len()).max().unwrap_or(1);
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK + longest];
    let mut hits: Vec<Vec<String>> = vec![vec![]; needles.len()];
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let name = fields.nth(3).unwrap_or("").to_owned();
        if !perms.starts_with('r') || name.starts_with("[vvar") || name == "[vsyscall]" {
            continue;
        }
        let (start, end) = range.split_once('-').expect("maps range");
        let start = u64::from_str_radix(start, 16).expect("hex");
        let end = u64::from_str_radix(end, 16).expect("hex");
        let mut addr = start;
        while addr < end {
            let want = ((end - addr) as usize).min(CHUNK + longest);
            let Ok(got) = mem.read_at(&mut buf[..want], addr) else {
                break; // unreadable (e.g. guard pages)
            };
            if got == 0 {
                break;
            }
            let data = &buf[..got];
            let limit = if got == want && addr + (got as u64) < end {
                got.min(CHUNK)
            } else {
                got
            };
            for i in 0..limit {
                for &n in &by_first[usize::from(data[i])] {
                    let m = &needles[n].masked;
                    if i + m.len() <= got
                        && data[i..i + m.len()]
                            .iter()
                            .zip(m)
                            .all(|(a, b)| a ^ MASK == *b)
                    {
                        hits[n].push(format!("{:#x} in {perms} {name}", addr + i as u64));
                    }
                }
            }
            addr += limit as u64;
        }
    }
    hits
}

#[test]
fn no_secret_survives_in_process_memory_after_drop() {
    let key = HostSealingKey::generate();
    let host = xdr_wipe::XdrString::new("kvm-mem.example").unwrap();
    let volume = VolumeId(uuid::Uuid::new_v4());

    let mut list = vec![];
    let sealed = {
        let passphrase = generate_passphrase().unwrap();
        let data_key = generate_data_key(DataKeySize::Bits512).unwrap();
        list.extend(needles("passphrase", passphrase.expose_secret()));
        list.extend(needles("data key", data_key.expose_secret()));
        let packet = KeyPacket {
            version: PacketVersion::V1,
            volume_id: volume,
            generation: 1,
            mechanism: Mechanism::QemuLuksPassphrase,
            params: CipherParams::aes_xts(VolumeFormat::Qcow2),
            secret: passphrase,
            recovery: Recovery::DataKey(data_key),
        };
        seal(&packet, &host, &key.public_key()).unwrap().to_bytes()
    };
    // A header backup travels in a second packet (one recovery arm each).
    let backup = SecretOpaque::new_with(64 << 10, |b| getrandom::fill(b).unwrap()).unwrap();
    list.extend(needles("header backup", backup.expose_secret()));
    let sealed_backup = {
        let packet = KeyPacket {
            version: PacketVersion::V1,
            volume_id: volume,
            generation: 2,
            mechanism: Mechanism::LuksVolumeKey,
            params: CipherParams::aes_xts(VolumeFormat::Raw),
            secret: generate_data_key(DataKeySize::Bits256)
                .map(|k| SecretOpaque::copy_from_secret_slice(k.expose_secret()).unwrap())
                .unwrap(),
            recovery: Recovery::HeaderBackup(backup),
        };
        seal(&packet, &host, &key.public_key()).unwrap().to_bytes()
    };

    // Open both; while the opened packets live, every secret is found.
    let opened = open(&sealed, &key, &host, volume, 1).unwrap();
    let opened_backup = open(&sealed_backup, &key, &host, volume, 2).unwrap();
    let alive = scan(&list);
    for (n, h) in list.iter().zip(&alive) {
        assert!(
            !h.is_empty(),
            "control scan did not find the live {}: the scanner is broken",
            n.what
        );
    }

    if std::env::var_os("GUESTKEY_TEST_PLANT_LEAK").is_some() {
        // Self-check of this test: an unwiped, freed copy must be reported.
        drop(opened.secret.expose_secret().to_vec());
    }
    drop(opened);
    drop(opened_backup);
    drop(sealed);
    drop(sealed_backup);

    let after = scan(&list);
    let leaks: Vec<String> = list
        .iter()
        .zip(&after)
        .filter(|(_, h)| !h.is_empty())
        .map(|(n, h)| format!("{}: {} copies, at {}", n.what, h.len(), h.join(", ")))
        .collect();
    assert!(
        leaks.is_empty(),
        "secrets left in memory after drop:\n{}",
        leaks.join("\n")
    );
}

/// The test above can fail: run it in a child process with a planted,
/// freed-but-unwiped copy of the passphrase, and expect it to report it.
#[test]
fn the_memory_scan_reports_a_planted_leak() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "no_secret_survives_in_process_memory_after_drop",
            "--test-threads=1",
        ])
        .env("GUESTKEY_TEST_PLANT_LEAK", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "planted leak went unnoticed:\n{stdout}"
    );
    assert!(
        stdout.contains("secrets left in memory after drop") && stdout.contains("passphrase"),
        "{stdout}"
    );
}

/// A split key: both halves opened and combined, then dropped: neither
/// half nor the passphrase stays.
#[test]
fn no_half_or_combined_passphrase_survives_after_drop() {
    use xdr_wipe::packet::{combine_halves, generate_half};
    let key = HostSealingKey::generate();
    let host = xdr_wipe::XdrString::new("kvm-mem.example").unwrap();
    let volume = VolumeId(uuid::Uuid::new_v4());
    let mut list = vec![];
    let mut sealed = vec![];
    for what in ["U", "V"] {
        let half = generate_half().unwrap();
        list.extend(needles(what, half.expose_secret()));
        let mut packet =
            KeyPacket::passphrase(volume, 3, CipherParams::aes_xts(VolumeFormat::Qcow2), half);
        packet.mechanism = Mechanism::QemuLuksPassphraseHalf;
        sealed.push(seal(&packet, &host, &key.public_key()).unwrap().to_bytes());
    }
    let u = open(&sealed[0], &key, &host, volume, 3).unwrap();
    let v = open(&sealed[1], &key, &host, volume, 3).unwrap();
    let k = combine_halves(&u, &v).unwrap();
    list.extend(needles("passphrase", k.secret.expose_secret()));
    let alive = scan(&list);
    for (n, h) in list.iter().zip(&alive) {
        assert!(
            !h.is_empty(),
            "control scan did not find the live {}",
            n.what
        );
    }
    drop((u, v, k, sealed));
    let after = scan(&list);
    let leaks: Vec<String> = list
        .iter()
        .zip(&after)
        .filter(|(_, h)| !h.is_empty())
        .map(|(n, h)| format!("{}: {} copies, at {}", n.what, h.len(), h.join(", ")))
        .collect();
    assert!(
        leaks.is_empty(),
        "left in memory after drop:\n{}",
        leaks.join("\n")
    );
}
