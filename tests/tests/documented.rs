//! Every command the README and `docs/` show works as written.
//!
//! `every_documented_command_names_what_exists` reads each command out of
//! the Markdown (inline code and fenced blocks) and checks it against what
//! exists: guestkey's own programs by their `--help` (each subcommand and
//! each flag, at the place it is written), `cargo bench|test -p P --bench|
//! --test T [FILTER]` against the workspace's targets (and the filter
//! against the test's functions), `cargo fuzz run T` against the fuzz
//! crate of the folder it is run in, and `scripts/X --flag` against the
//! script's header. Placeholders (`VOL`, `FILE`, `...`, `[--opt]`,
//! `a|b`) are read as the docs mean them.
//!
//! `documented_commands_that_are_cheap_run_as_written` (`#[ignore]`d; run
//! by `scripts/test` after the suite) runs the cheap ones for real: the
//! README's fuzzing command for a few seconds, and `scripts/demo --cleanup`
//! when no demo is there.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Markdown files whose commands are checked.
fn documents() -> Vec<PathBuf> {
    let mut out = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    out.extend(docs);
    out
}

/// One command as written, and where.
#[derive(Debug, Clone)]
struct Documented {
    file: String,
    text: String,
}

/// The commands in a Markdown text: inline code spans, and the lines of
/// fenced blocks (a line ending in `\` goes on), with `# comments` and a
/// leading `$ ` dropped.
fn commands_in(file: &str, md: &str) -> Vec<Documented> {
    let mut out = vec![];
    let mut fenced = false;
    let mut pending = String::new();
    for line in md.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            let l = line.trim();
            let l = l.strip_prefix("$ ").unwrap_or(l);
            let l = match l.find(" #") {
                Some(i) => &l[..i],
                None => l,
            };
            if let Some(cont) = l.strip_suffix('\\') {
                pending.push_str(cont);
                pending.push(' ');
                continue;
            }
            pending.push_str(l);
            let text = std::mem::take(&mut pending)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            if !text.is_empty() {
                out.push(Documented {
                    file: file.to_owned(),
                    text,
                });
            }
            continue;
        }
        let mut parts = line.split('`');
        parts.next();
        while let (Some(code), Some(_)) = (parts.next(), parts.next()) {
            out.push(Documented {
                file: file.to_owned(),
                text: code.trim().to_owned(),
            });
        }
    }
    out
}

/// The simple commands of a command line (split at `&&` and `;`), each as
/// words, variable assignments in front dropped, cut at a redirection.
fn simple_commands(text: &str) -> Vec<Vec<String>> {
    text.split("&&")
        .flat_map(|p| p.split(';'))
        .map(|c| {
            c.split_whitespace()
                .skip_while(|w| w.contains('=') && !w.starts_with('-'))
                .take_while(|w| !w.starts_with('>') && !w.starts_with('<') && *w != "2>&1")
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|c| !c.is_empty())
        .collect()
}

const OURS: [&str; 5] = [
    "guestkey-recover",
    "guestkeyctl",
    "guestkeyd",
    "guestkey-server",
    "guestkey-hook",
];

/// What a program's `--help` says at one subcommand path.
struct Help {
    subcommands: BTreeSet<String>,
    /// Flag, and whether it takes a value.
    flags: BTreeMap<String, bool>,
}

fn parse_help(text: &str) -> Help {
    let mut subcommands = BTreeSet::new();
    let mut flags = BTreeMap::new();
    let mut in_commands = false;
    for line in text.lines() {
        if line.starts_with("Commands:") {
            in_commands = true;
            continue;
        }
        if !line.starts_with(' ') {
            in_commands = false;
        }
        let t = line.trim_start();
        if in_commands && line.starts_with("  ") && !t.is_empty() {
            if let Some(name) = t.split_whitespace().next() {
                subcommands.insert(name.trim_end_matches(',').to_owned());
            }
        }
        if t.starts_with('-') {
            let words: Vec<&str> = t.split_whitespace().collect();
            for (i, w) in words.iter().enumerate() {
                let w = w.trim_end_matches(',');
                if !w.starts_with('-') {
                    break;
                }
                let (flag, inline_value) = match w.split_once('=') {
                    Some((f, _)) => (f, true),
                    None => (w, false),
                };
                let value = inline_value || words.get(i + 1).is_some_and(|n| n.starts_with('<'));
                flags.insert(flag.to_owned(), value);
            }
        }
    }
    Help { subcommands, flags }
}

struct Checker {
    helps: BTreeMap<Vec<String>, Result<Help, String>>,
    bin_dir: PathBuf,
    targets: BTreeMap<(String, String), PathBuf>,
}

impl Checker {
    fn new() -> Self {
        let bin_dir = guestkey_testkit::target_bin(&root(), "guestkeyctl")
            .parent()
            .unwrap()
            .to_owned();
        Self {
            helps: BTreeMap::new(),
            bin_dir,
            targets: workspace_targets(),
        }
    }

    fn help(&mut self, path: &[String]) -> &Result<Help, String> {
        let bin = self.bin_dir.join(&path[0]);
        self.helps.entry(path.to_vec()).or_insert_with(|| {
            let out = Command::new(&bin)
                .args(&path[1..])
                .arg("--help")
                .output()
                .map_err(|e| format!("{}: {e}", bin.display()))?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
            }
            Ok(parse_help(&String::from_utf8_lossy(&out.stdout)))
        })
    }

    /// Problems with one simple command (empty: it is right).
    fn check(&mut self, words: &[String], cwd: &Path) -> Vec<String> {
        let program = words[0].rsplit('/').next().unwrap_or(&words[0]).to_owned();
        if OURS.contains(&program.as_str()) {
            return self.check_ours(&program, &words[1..]);
        }
        match (words[0].as_str(), words.get(1).map(String::as_str)) {
            ("cargo", Some("bench" | "test")) => self.check_cargo_target(words),
            ("cargo", Some("fuzz")) => check_fuzz(words, cwd),
            (w, _) if w.starts_with("scripts/") => check_script(words),
            _ => vec![],
        }
    }

    fn check_ours(&mut self, program: &str, args: &[String]) -> Vec<String> {
        let mut path = vec![program.to_owned()];
        let mut problems = vec![];
        let mut skip_value = false;
        for raw in args {
            let word = raw.trim_matches(|c| c == '[' || c == ']');
            if skip_value || word.is_empty() || word == "|" || word.starts_with("...") {
                skip_value = false;
                continue;
            }
            let help = match self.help(&path) {
                Ok(h) => h,
                Err(e) => {
                    problems.push(format!("`{} --help` fails: {e}", path.join(" ")));
                    return problems;
                }
            };
            if word.starts_with('-') {
                for alt in word.split('|') {
                    let flag = alt.split('=').next().unwrap_or(alt);
                    match help.flags.get(flag) {
                        Some(takes) => skip_value = *takes && !alt.contains('='),
                        None => problems.push(format!("`{}` has no flag {flag}", path.join(" "))),
                    }
                }
                continue;
            }
            let first = word.split('|').next().unwrap_or(word);
            if help.subcommands.contains(first) {
                for alt in word.split('|') {
                    if !help.subcommands.contains(alt) {
                        problems.push(format!("`{}` has no subcommand {alt}", path.join(" ")));
                    }
                }
                path.push(first.to_owned());
            } else if !help.subcommands.is_empty()
                && first.chars().all(|c| c.is_ascii_lowercase() || c == '-')
            {
                problems.push(format!(
                    "`{}` has no subcommand {first} (it has: {})",
                    path.join(" "),
                    help.subcommands
                        .iter()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                return problems;
            }
        }
        if let Err(e) = self.help(&path) {
            problems.push(format!("`{} --help` fails: {e}", path.join(" ")));
        }
        problems
    }

    /// `cargo bench|test -p P --bench|--test T [FILTER]`.
    fn check_cargo_target(&self, words: &[String]) -> Vec<String> {
        let arg = |flag: &str| {
            words
                .iter()
                .position(|w| w == flag)
                .and_then(|i| words.get(i + 1))
                .cloned()
        };
        let (Some(package), Some((kind, target))) = (
            arg("-p"),
            arg("--bench")
                .map(|t| ("bench", t))
                .or_else(|| arg("--test").map(|t| ("test", t))),
        ) else {
            return vec![];
        };
        let Some(src) = self
            .targets
            .get(&(package.clone(), format!("{kind}:{target}")))
        else {
            return vec![format!("package {package} has no {kind} target {target}")];
        };
        // A filter after the target names a test function of it.
        let filter = words
            .iter()
            .skip_while(|w| **w != target)
            .skip(1)
            .find(|w| !w.starts_with('-'));
        match filter {
            Some(f) if kind == "test" => {
                let text = std::fs::read_to_string(src).unwrap_or_default();
                if text.contains(&format!("fn {f}")) {
                    vec![]
                } else {
                    vec![format!("{} has no test named {f}…", src.display())]
                }
            }
            _ => vec![],
        }
    }
}

/// (package, "kind:name") to the target's source, from `cargo metadata`.
fn workspace_targets() -> BTreeMap<(String, String), PathBuf> {
    let out = Command::new("cargo")
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut targets = BTreeMap::new();
    for p in meta["packages"].as_array().unwrap() {
        let package = p["name"].as_str().unwrap().to_owned();
        for t in p["targets"].as_array().unwrap() {
            for kind in t["kind"].as_array().unwrap() {
                let key = format!("{}:{}", kind.as_str().unwrap(), t["name"].as_str().unwrap());
                let src = PathBuf::from(t["src_path"].as_str().unwrap());
                targets.insert((package.clone(), key), src);
            }
        }
    }
    targets
}

/// `cargo fuzz run TARGET [CORPUS...]` run in `cwd`: the target exists in
/// the fuzz crate there, and so do the seed folders named.
fn check_fuzz(words: &[String], cwd: &Path) -> Vec<String> {
    let Some(target) = words.get(3).filter(|t| !is_placeholder(t)) else {
        return vec![];
    };
    let manifest = cwd.join("Cargo.toml");
    let Ok(text) = std::fs::read_to_string(&manifest) else {
        return vec![format!(
            "`cargo fuzz` runs in {}, which has no Cargo.toml",
            cwd.display()
        )];
    };
    let mut problems = vec![];
    if !text.contains(&format!("name = \"{target}\"")) {
        problems.push(format!(
            "{} has no fuzz target {target}",
            manifest.display()
        ));
    }
    for dir in words[4..].iter().take_while(|w| *w != "--") {
        if dir.starts_with("seeds/") && !cwd.join(dir).is_dir() {
            problems.push(format!("{} has no folder {dir}", cwd.display()));
        }
    }
    problems
}

/// `scripts/X [--flag ...]`: the script exists, and its header shows each
/// flag.
fn check_script(words: &[String]) -> Vec<String> {
    if words[0].ends_with('/') || words[0].contains('*') {
        return vec![]; // the folder or its files, not a command
    }
    let path = root().join(&words[0]);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return vec![format!("there is no {}", words[0])];
    };
    let header: BTreeSet<&str> = text
        .lines()
        .take_while(|l| l.starts_with('#'))
        .flat_map(|l| l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')))
        .collect();
    words[1..]
        .iter()
        .filter(|w| w.starts_with("--"))
        .filter(|w| !header.contains(w.as_str()))
        .map(|w| format!("{}'s header does not show {w}", words[0]))
        .collect()
}

fn is_placeholder(w: &str) -> bool {
    w.chars().all(|c| c.is_ascii_uppercase() || c == '_')
}

#[test]
fn every_documented_command_names_what_exists() {
    let mut checker = Checker::new();
    let mut problems = vec![];
    let mut checked = 0;
    for doc in documents() {
        let md = std::fs::read_to_string(&doc).unwrap();
        let shown = doc
            .strip_prefix(root())
            .unwrap_or(&doc)
            .display()
            .to_string();
        for d in commands_in(&shown, &md) {
            let mut cwd = root();
            for words in simple_commands(&d.text) {
                if words[0] == "cd" {
                    match words.get(1) {
                        Some(dir) if root().join(dir).is_dir() => cwd = root().join(dir),
                        Some(dir) => {
                            problems.push(format!("{}: `{}`: no folder {dir}", d.file, d.text))
                        }
                        None => {}
                    }
                    continue;
                }
                let found = checker.check(&words, &cwd);
                checked += 1;
                for p in found {
                    problems.push(format!("{}: `{}`: {p}", d.file, d.text));
                }
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} commands found: is the extraction broken?"
    );
    assert!(
        problems.is_empty(),
        "documented commands that do not work:\n  {}",
        problems.join("\n  ")
    );
}

/// The checker itself finds what is wrong (a check that cannot fail is
/// none).
#[test]
fn the_checker_finds_a_wrong_subcommand_flag_target_or_script_flag() {
    let mut c = Checker::new();
    let words = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    let here = root();
    assert!(
        c.check(
            &words("guestkeyctl volume create --host H --pool P --name N --size 1G"),
            &here
        )
        .is_empty()
    );
    assert!(
        c.check(
            &words("guestkeyctl volume rekey VOL --shallow|--deep"),
            &here
        )
        .is_empty()
    );
    let e = c.check(&words("guestkeyctl volume creat --host H"), &here);
    assert!(e[0].contains("has no subcommand creat"), "{e:?}");
    let e = c.check(&words("guestkeyd run --state-dir S --no-such-flag"), &here);
    assert!(e[0].contains("has no flag --no-such-flag"), "{e:?}");
    let e = c.check(&words("cargo bench -p host-daemon --bench rekeys"), &here);
    assert!(e[0].contains("no bench target rekeys"), "{e:?}");
    let e = c.check(
        &words("cargo test -p guestkey-tests --test host no_such_test"),
        &here,
    );
    assert!(e[0].contains("no test named no_such_test"), "{e:?}");
    let e = c.check(&words("scripts/demo --clean"), &here);
    assert!(e[0].contains("does not show --clean"), "{e:?}");
    let e = c.check(
        &words("cargo fuzz run roundtrips corpus/x seeds/roundtrip"),
        &here.join("xdr-wipe/fuzz"),
    );
    assert!(e[0].contains("no fuzz target roundtrips"), "{e:?}");
    let found = commands_in(
        "x.md",
        "a `guestkeyd run` b\n```\n$ guestkey-server init \\\n  --data-dir D   # c\n```\n",
    );
    let texts: Vec<&str> = found.iter().map(|d| d.text.as_str()).collect();
    assert_eq!(
        texts,
        ["guestkeyd run", "guestkey-server init --data-dir D"]
    );
    assert_eq!(
        simple_commands("cd a && X=1 cargo fuzz run t; guestkeyctl ca-cert > f"),
        [
            vec!["cd", "a"],
            vec!["cargo", "fuzz", "run", "t"],
            vec!["guestkeyctl", "ca-cert"]
        ]
    );
}

/// The cheap documented commands, run as written.
#[test]
#[ignore = "run by scripts/test after the suite: it builds the fuzz target"]
fn documented_commands_that_are_cheap_run_as_written() {
    // The README's fuzzing command, for a few seconds instead of ten
    // minutes; the corpus folder it makes is removed again if it was not
    // there.
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let fuzz = commands_in("README.md", &readme)
        .into_iter()
        .find(|d| d.text.contains("cargo fuzz run"))
        .expect("the README shows a fuzzing command");
    let text = fuzz
        .text
        .replace("-max_total_time=600", "-max_total_time=5");
    assert_ne!(
        text, fuzz.text,
        "the README's fuzzing command has no -max_total_time=600"
    );
    let corpus = root().join("xdr-wipe/fuzz/corpus");
    let had_corpus = corpus.exists();
    let out = Command::new("sh")
        .args(["-c", &text])
        .current_dir(root())
        .output()
        .unwrap();
    if !had_corpus {
        let _ = std::fs::remove_dir_all(&corpus);
    }
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "`{text}` failed:\n{said}");
    assert!(said.contains("Done ") || said.contains("runs in"), "{said}");

    // `scripts/demo --cleanup` with no demo there.
    let demo_dir = Path::new("/var/lib/guestkey-demo");
    if demo_dir.exists() {
        println!("a demo is there: `scripts/demo --cleanup` not run");
        return;
    }
    let out = Command::new(root().join("scripts/demo"))
        .arg("--cleanup")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("demo removed"));
}
