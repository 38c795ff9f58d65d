//! Searching another process's memory for a key (as root, through
//! /proc/PID/maps and /proc/PID/mem).
//!
//! The needle is kept only masked (each byte XOR a constant) and compared
//! on the fly, so the searching process never plants what it looks for.
//! A needle stands for the whole key and three 16-byte fragments of it, so
//! that a partial copy is found too.

use std::fs::File;
use std::os::unix::fs::FileExt;

const MASK: u8 = 0x5a;
const FRAGMENT: usize = 16;

/// Masked search patterns for one secret.
pub struct Needles(Vec<(String, Vec<u8>)>);

impl Needles {
    /// Patterns for `secret` (at least 16 bytes), masked at once.
    pub fn of(secret: &[u8]) -> Self {
        assert!(secret.len() >= FRAGMENT);
        let masked: Vec<u8> = secret.iter().map(|b| b ^ MASK).collect();
        let mid = secret.len() / 2 - FRAGMENT / 2;
        let mut v = vec![];
        for (part, at) in [
            ("start", 0),
            ("middle", mid),
            ("end", secret.len() - FRAGMENT),
        ] {
            v.push((
                format!("{part} fragment"),
                masked[at..at + FRAGMENT].to_vec(),
            ));
        }
        v.push(("whole key".to_owned(), masked));
        Self(v)
    }

    /// Where in process `pid`'s memory any pattern occurs.
    pub fn find_in(&self, pid: u32) -> Vec<String> {
        let maps =
            std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps (run as root)");
        let mem = File::open(format!("/proc/{pid}/mem")).expect("open mem (run as root)");
        let longest = self.0.iter().map(|(_, n)| n.len()).max().unwrap_or(1);
        const CHUNK: usize = 1 << 20;
        let mut buf = vec![0u8; CHUNK + longest];
        let mut hits = vec![];
        for line in maps.lines() {
            let mut f = line.split_whitespace();
            let (Some(range), Some(perms)) = (f.next(), f.next()) else {
                continue;
            };
            let name = f.nth(3).unwrap_or("").to_owned();
            if !perms.starts_with('r') || name.starts_with("[vvar") || name == "[vsyscall]" {
                continue;
            }
            let Some((a, b)) = range.split_once('-') else {
                continue;
            };
            let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
            else {
                continue;
            };
            let mut addr = start;
            while addr < end {
                let want = ((end - addr) as usize).min(CHUNK + longest);
                let Ok(got) = mem.read_at(&mut buf[..want], addr) else {
                    break;
                };
                if got == 0 {
                    break;
                }
                let data = &buf[..got];
                let step = if got == want && addr + (got as u64) < end {
                    got.min(CHUNK)
                } else {
                    got
                };
                for i in 0..step {
                    for (what, n) in &self.0 {
                        if data[i] ^ MASK == n[0]
                            && i + n.len() <= got
                            && data[i..i + n.len()]
                                .iter()
                                .zip(n)
                                .all(|(x, y)| x ^ MASK == *y)
                        {
                            hits.push(format!("{what} at {:#x} ({perms} {name})", addr + i as u64));
                        }
                    }
                }
                addr += step as u64;
            }
        }
        hits
    }
}
