//! `guestkeyctl completions SHELL` and `guestkeyctl man DIR`: the shell
//! completion script (clap_complete) and the manual pages (clap_mangen),
//! both made from the same `Cli` as the parser, so they cannot drift from
//! it. scripts/test and scripts/demo install them after the build
//! (bash: /usr/share/bash-completion/completions/guestkeyctl; pages:
//! /usr/local/share/man/man1).

use std::path::Path;

use clap::CommandFactory;

use crate::{Cli, Failure};

/// The program's name, as installed.
const NAME: &str = "guestkeyctl";

/// The completion script for `shell`, on stdout.
pub(crate) fn completions(shell: clap_complete::Shell) {
    clap_complete::generate(shell, &mut Cli::command(), NAME, &mut std::io::stdout());
}

/// Writes `guestkeyctl.1` and one page a subcommand
/// (`guestkeyctl-volume-create.1`, ...) into `dir`; says how many.
pub(crate) fn man(dir: &Path) -> Result<(), Failure> {
    std::fs::create_dir_all(dir).map_err(|e| {
        Failure(format!(
            "cannot make the directory {} for the manual pages: {e}",
            dir.display()
        ))
    })?;
    let mut cmd = Cli::command();
    // Global options (--server, --admin-dir, --json) onto every page.
    cmd.build();
    let n = pages(&cmd, NAME, dir)?;
    println!("{n} manual pages written to {}", dir.display());
    Ok(())
}

/// Writes the page of `cmd` as `name` and those of its subcommands.
fn pages(cmd: &clap::Command, name: &str, dir: &Path) -> Result<usize, Failure> {
    let page = cmd.clone().name(name.to_owned());
    let mut roff = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut roff)
        .map_err(|e| Failure(format!("cannot render the manual page of {name}: {e}")))?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, roff)
        .map_err(|e| Failure(format!("cannot write {}: {e}", path.display())))?;
    let mut n = 1;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        n += pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command and every argument says what it is for (the man pages
    /// and `--help` are only as good as this).
    #[test]
    fn every_command_and_argument_has_a_help_text() {
        let mut cmd = Cli::command();
        cmd.build();
        cmd.clone().debug_assert();
        let mut missing = vec![];
        let mut seen = 0;
        walk(&cmd, NAME, &mut |path, c| {
            seen += 1;
            let about = c.get_about().map(|a| a.to_string()).unwrap_or_default();
            if about.trim().is_empty() {
                missing.push(format!("{path}: no description"));
            }
            for a in c.get_arguments() {
                let id = a.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
                if help.trim().is_empty() {
                    missing.push(format!("{path} {id}: no help text"));
                }
            }
        });
        assert!(missing.is_empty(), "{}", missing.join("\n"));
        assert!(seen > 40, "only {seen} commands walked");
    }

    fn walk(cmd: &clap::Command, path: &str, f: &mut dyn FnMut(&str, &clap::Command)) {
        f(path, cmd);
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            walk(sub, &format!("{path} {}", sub.get_name()), f);
        }
    }

    fn script() -> String {
        let mut out = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Cli::command(),
            NAME,
            &mut out,
        );
        String::from_utf8(out).unwrap()
    }

    /// What bash offers after `words` (the last one being typed), with the
    /// generated script loaded.
    fn complete(words: &[&str]) -> Vec<String> {
        let dir = std::env::temp_dir().join(format!("gk-compl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("{}.bash", words.join("_")));
        std::fs::write(&file, script()).unwrap();
        let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
        let cword = words.len() - 1;
        let prev = if cword > 0 { words[cword - 1] } else { "" };
        let line = format!(
            "source '{}'; COMP_WORDS=({}); COMP_CWORD={cword}; COMP_LINE='{}'; COMP_POINT=${{#COMP_LINE}}; \
             _guestkeyctl guestkeyctl '{}' '{prev}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            file.display(),
            quoted.join(" "),
            words.join(" "),
            words[cword],
        );
        let out = std::process::Command::new("bash")
            .args(["--norc", "-c", &line])
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn the_bash_script_completes_commands_subcommands_and_options() {
        assert_eq!(complete(&["guestkeyctl", "vol"]), ["volume"]);
        assert_eq!(complete(&["guestkeyctl", "volume", "cre"]), ["create"]);
        let opts = complete(&["guestkeyctl", "volume", "create", "--fo"]);
        assert!(opts.contains(&"--format".to_owned()), "{opts:?}");
        let none = complete(&["guestkeyctl", "no-such-thing", "x"]);
        assert!(!none.contains(&"volume".to_owned()), "{none:?}");
    }

    #[test]
    fn man_pages_are_written_for_every_command_and_read_by_man() {
        let dir = std::env::temp_dir().join(format!("gk-man-{}", std::process::id()));
        man(&dir).map_err(|e| e.0).unwrap();
        let mut want = 0;
        walk(&Cli::command(), NAME, &mut |_, _| want += 1);
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(files.len(), want);
        // groff reads it without a warning, and the text is the help's.
        let page = dir.join("guestkeyctl-volume-create.1");
        let out = std::process::Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-P-bou"])
            .arg(&page)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let warnings = String::from_utf8_lossy(&out.stderr).to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(out.status.success() && warnings.is_empty(), "{warnings}");
        assert!(text.contains("guestkeyctl-volume-create"), "{text}");
        assert!(text.contains("--format"), "{text}");
        assert!(text.contains("--admin-dir"), "global options on every page");
        // A directory that cannot be made: the error names it.
        let e = man(Path::new("/proc/no/such/dir")).err().unwrap();
        assert!(e.0.contains("/proc/no/such/dir"), "{}", e.0);
    }
}
