//! Benchmark: seal+encode and open+decode of one key packet, against copying
//! the same number of bytes, all measured in the same run (the machine is
//! shared and noisy, so only ratios are comparable between runs).
//!
//! `cargo bench -p xdr-wipe --bench packet` (add `-- --quick` for a smoke run).
//! Every loop is bounded by a fixed count.

use std::hint::black_box;
use std::time::{Duration, Instant};

use xdr_wipe::packet::{CipherParams, KeyPacket, VolumeFormat, VolumeId, generate_passphrase};
use xdr_wipe::seal::{HostSealingKey, open, seal};

/// Median of `rounds` timings of `iters` calls of `f`.
fn measure(rounds: usize, iters: usize, mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iters {
                f();
            }
            start.elapsed()
        })
        .collect();
    times.sort();
    times[rounds / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, iters) = if quick { (3, 50) } else { (11, 2000) };

    let key = HostSealingKey::generate();
    let public = key.public_key();
    let host = xdr_wipe::XdrString::new("kvm-bench.example").expect("short host name");
    let volume = VolumeId(uuid::Uuid::new_v4());
    let packet = KeyPacket::passphrase(
        volume,
        1,
        CipherParams::aes_xts(VolumeFormat::Qcow2),
        generate_passphrase().expect("OS RNG"),
    );
    let sealed = seal(&packet, &host, &public).expect("seal").to_bytes();
    let size = sealed.len();

    let seal_time = measure(rounds, iters, || {
        black_box(
            seal(black_box(&packet), &host, &public)
                .expect("seal")
                .to_bytes(),
        );
    });
    let open_time = measure(rounds, iters, || {
        black_box(open(black_box(&sealed), &key, &host, volume, 1).expect("open"));
    });
    let mut dst = vec![0u8; size];
    let copy_time = measure(rounds, iters, || {
        dst.copy_from_slice(black_box(&sealed));
        black_box(&mut dst);
    });

    let per_sec = |t: Duration| iters as f64 / t.as_secs_f64();
    let ratio = |t: Duration| t.as_secs_f64() / copy_time.as_secs_f64().max(1e-12);
    println!("key packet: {size} bytes sealed; median of {rounds} rounds x {iters} packets");
    println!(
        "seal+encode: {:>10.0} packets/s   {:>8.1}x the time of copying {size} bytes",
        per_sec(seal_time),
        ratio(seal_time)
    );
    println!(
        "open+decode: {:>10.0} packets/s   {:>8.1}x the time of copying {size} bytes",
        per_sec(open_time),
        ratio(open_time)
    );
    println!("copy (baseline): {:>10.0} copies/s", per_sec(copy_time));
}
