//! `guestkeyctl console-user ...`: the logins of the web console. The
//! password goes to the server over the admin's mutual TLS and is kept only
//! as an argon2id hash. Imports `connect` and `output`.

use std::io::BufRead;
use std::path::PathBuf;

use clap::Subcommand;
use guestkey_proto::admin as pb;
use serde_json::json;

use crate::Failure;
use crate::connect::{Ctx, rpc_error};
use crate::output;

#[derive(Subcommand)]
pub(crate) enum ConsoleUserCmd {
    /// Make a login of the web console, or give an existing one a new
    /// password (12 to 1024 characters): read from --password-file, or the
    /// first line of standard input.
    Add {
        /// The login name.
        #[arg(value_name = "NAME")]
        name: String,
        /// A file whose first line is the password (e.g. made by a
        /// password manager; mode 0600).
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
    /// Remove a login (its sessions end at their next request).
    Remove {
        /// The login name.
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// List the logins.
    List,
}

fn password(file: Option<PathBuf>) -> Result<zeroize::Zeroizing<String>, Failure> {
    let mut line = zeroize::Zeroizing::new(String::new());
    match file {
        Some(path) => {
            let f = std::fs::File::open(&path)
                .map_err(|e| Failure(format!("--password-file {}: {e}", path.display())))?;
            std::io::BufReader::new(f)
                .read_line(&mut line)
                .map_err(|e| Failure(format!("--password-file {}: {e}", path.display())))?;
        }
        None => {
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprint!(
                    "Password for the console login (shown as typed; prefer --password-file): "
                );
            }
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| Failure(format!("reading the password from standard input: {e}")))?;
        }
    }
    let trimmed = zeroize::Zeroizing::new(line.trim_end_matches(['\n', '\r']).to_owned());
    if trimmed.is_empty() {
        return Err(Failure(
            "no password: give it in --password-file FILE or on standard input".into(),
        ));
    }
    Ok(trimmed)
}

pub(crate) async fn run(cmd: ConsoleUserCmd, ctx: &Ctx) -> Result<(), Failure> {
    let users = match cmd {
        ConsoleUserCmd::Add {
            name,
            password_file,
        } => {
            let mut pw = password(password_file)?;
            let u = ctx
                .connect()
                .await?
                .set_console_user(pb::SetConsoleUserRequest {
                    name,
                    password: std::mem::take(&mut *pw),
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            vec![u]
        }
        ConsoleUserCmd::Remove { name } => {
            let u = ctx
                .connect()
                .await?
                .remove_console_user(pb::ConsoleUserRef { name })
                .await
                .map_err(rpc_error)?
                .into_inner();
            vec![u]
        }
        ConsoleUserCmd::List => {
            ctx.connect()
                .await?
                .list_console_users(pb::ListConsoleUsersRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner()
                .users
        }
    };
    output::emit(
        ctx.json,
        json!(
            users
                .iter()
                .map(|u| json!({"name": u.name, "created_unix": u.created_unix, "by": u.by}))
                .collect::<Vec<_>>()
        ),
        output::table(
            &["LOGIN", "SET", "BY"],
            users
                .iter()
                .map(|u| vec![u.name.clone(), output::time(u.created_unix), u.by.clone()])
                .collect(),
        ),
    );
    Ok(())
}
