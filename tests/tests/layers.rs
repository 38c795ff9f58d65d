//! The architecture of docs/architecture.md, checked on the source:
//!
//! - tonic and prost (and the generated `guestkey_proto` types) appear only
//!   in the gRPC adapters and converters, never in domain code;
//! - each module of the host daemon imports only the layers below it, so
//!   there are no import cycles between them.
//!
//! Comments are ignored; code is matched as text (`crate::X`, `tonic::`).

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `.rs` file under `dir`, relative to the workspace root.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name();
        if name == "target" || name == "fuzz" || name == ".git" {
            continue;
        }
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p.strip_prefix(root()).unwrap_or(&p).to_path_buf());
        }
    }
}

/// The file's code without `//` comments (doc comments included).
fn code(p: &Path) -> String {
    std::fs::read_to_string(root().join(p))
        .unwrap()
        .lines()
        .map(|l| match l.find("//") {
            // Not inside a string: good enough for this tree (no "//" in
            // string literals on lines that also name tonic or crate::).
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Where tonic and prost may appear, and why.
const GRPC_ALLOWED: &[(&str, &str)] = &[
    ("proto/", "the generated schema crate"),
    (
        "host-daemon/src/grpc/",
        "the host daemon's gRPC adapters: host-agent service, pb converters, enrollment and report clients",
    ),
    (
        "mgmt-server/src/transport/",
        "the server's gRPC adapters: admin and host services, pb converters, the host-agent client",
    ),
    (
        "mgmt-server/src/bin/guestkeyctl/",
        "the admin CLI: a client of the admin API that renders its answers (no domain logic)",
    ),
    (
        "mgmt-server/tests/",
        "integration tests speak gRPC to the real server (TestAgent)",
    ),
    (
        "mgmt-server/benches/",
        "the push benchmark's bare mutual-TLS baseline",
    ),
    ("tests/", "end-to-end tests and their harness"),
];

#[test]
fn only_the_grpc_adapters_import_tonic_or_prost() {
    let mut files = vec![];
    for krate in [
        "xdr-wipe",
        "protect",
        "instance",
        "pinned-tls",
        "proto",
        "mgmt-server",
        "host-daemon",
        "virt-plugin",
        "tests",
        "domxml",
    ] {
        rust_files(&root().join(krate), &mut files);
    }
    assert!(
        files.len() > 50,
        "found only {} files: wrong root?",
        files.len()
    );
    let mut bad = vec![];
    for f in &files {
        let c = code(f);
        let uses = [
            "tonic::",
            "use tonic",
            "prost::",
            "use prost",
            "guestkey_proto",
        ]
        .iter()
        .any(|p| c.contains(p));
        let shown = f.display().to_string();
        if uses
            && !GRPC_ALLOWED
                .iter()
                .any(|(prefix, _)| shown.starts_with(prefix))
        {
            bad.push(shown);
        }
    }
    assert!(
        bad.is_empty(),
        "tonic/prost outside the gRPC adapters: {bad:#?}"
    );
}

/// The host daemon's layers, bottom up: a module may import its own rank
/// or lower; modules of one rank do not import each other.
const HOST_LAYERS: &[(&str, u8)] = &[
    ("model", 0),
    ("state", 1),
    ("progress", 1),
    ("hardening", 1),
    ("instance", 1),
    ("escrow", 1),
    ("protect", 2),
    ("store", 3),
    ("image", 4),
    ("libvirt", 4),
    ("ops", 5),
    ("hook", 6),
    ("grpc", 6),
];

/// The management server's layers, bottom up (leaf modules first).
const SERVER_LAYERS: &[(&str, u8)] = &[
    ("ca", 0),
    ("masterkey", 0),
    ("tls", 0),
    ("datadir", 0),
    ("domxml", 0),
    ("shares", 0),
    ("config", 1),
    ("model", 1),
    ("store", 2),
    ("metrics", 2),
    ("domain", 3),
    ("database", 3),
    ("scheduler", 4),
    ("move_db", 4),
    ("roles", 4),
    ("tpm", 4),
    ("fuzzing", 4),
    ("recovery", 4),
    ("backup", 4),
    ("init", 5),
    ("admins", 5),
    ("transport", 6),
];

fn rank(layers: &[(&str, u8)], m: &str) -> Option<u8> {
    layers.iter().find(|(n, _)| *n == m).map(|(_, r)| *r)
}

/// Every `crate::X` a module of `src` uses must be of a lower layer.
fn check_layers(src: &str, layers: &[(&str, u8)]) {
    let mut files = vec![];
    rust_files(&root().join(src), &mut files);
    assert!(!files.is_empty(), "no files under {src}");
    let mut bad = vec![];
    for f in &files {
        let rel = f.strip_prefix(src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .into_owned();
        let module = first.trim_end_matches(".rs");
        if module == "lib" || module == "bin" {
            continue;
        }
        let Some(mine) = rank(layers, module) else {
            bad.push(format!("{}: module {module} has no layer", f.display()));
            continue;
        };
        let c = code(f);
        for (i, _) in c.match_indices("crate::") {
            let used: String = c[i + 7..]
                .chars()
                .take_while(|ch| ch.is_alphanumeric() || *ch == '_')
                .collect();
            if used == module {
                continue;
            }
            match rank(layers, &used) {
                Some(r) if r < mine => {}
                Some(_) => bad.push(format!(
                    "{}: {module} (layer {mine}) imports {used}",
                    f.display()
                )),
                None => bad.push(format!("{}: unknown module crate::{used}", f.display())),
            }
        }
    }
    assert!(bad.is_empty(), "layering broken in {src}: {bad:#?}");
}

#[test]
fn host_daemon_modules_import_only_the_layers_below() {
    check_layers("host-daemon/src", HOST_LAYERS);
}

#[test]
fn server_modules_import_only_the_layers_below() {
    check_layers("mgmt-server/src", SERVER_LAYERS);
}

#[test]
fn files_are_short_enough_to_read_in_one_sitting() {
    let mut files = vec![];
    for krate in [
        "xdr-wipe/src",
        "protect/src",
        "instance/src",
        "pinned-tls/src",
        "host-daemon/src",
        "virt-plugin/src",
        "domxml/src",
    ] {
        rust_files(&root().join(krate), &mut files);
    }
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let text = std::fs::read_to_string(root().join(f)).unwrap();
            // Tests at the bottom of a file do not count.
            let body = text.split("#[cfg(test)]").next().unwrap_or("");
            let n = body.lines().count();
            (n > 500).then(|| format!("{}: {n} lines", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "files over 500 lines of code: {long:#?}");
}
