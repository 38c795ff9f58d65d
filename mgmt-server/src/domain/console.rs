//! What the web console needs of the domain beyond what the admin API
//! has: its logins (names with argon2id password hashes, kept in the
//! database, set by an admin) and a volume's history read from the audit
//! log (when its key was made, its last shallow and deep rekeys, the hosts
//! that ever held a key of it). The console's actions themselves are the
//! admin API's domain calls, with the logged-in admin as the caller.

use std::collections::HashMap;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::domain::{Core, now_unix, now_unix_ms};
use crate::model::{AuditRecord, Caller, CoreError, InvalidInput, Name, Policy, VolumeInfo};
use crate::store::ConsoleSession;

/// Passwords of console logins: at least this long.
pub const MIN_PASSWORD: usize = 12;
/// And at most this long.
pub const MAX_PASSWORD: usize = 1024;
/// Records of a volume the console shows.
const HISTORY: u32 = 500;

/// argon2id with the parameters OWASP names for it (19 MiB, 2 passes).
fn hasher() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// A hash to verify against when the name is unknown, so that a wrong
/// name takes as long as a wrong password.
fn decoy() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| {
        SaltString::encode_b64(b"guestkey-decoy-salt")
            .ok()
            .and_then(|salt| {
                hasher()
                    .hash_password(b"not a password of anyone", &salt)
                    .ok()
                    .map(|h| h.to_string())
            })
            .unwrap_or_default()
    })
}

fn check_password(password: &str) -> Result<(), CoreError> {
    let n = password.chars().count();
    if !(MIN_PASSWORD..=MAX_PASSWORD).contains(&n) || password.chars().any(char::is_control) {
        return Err(InvalidInput {
            what: "password",
            value: "(not shown)".into(),
            why: format!(
                "a console password has {MIN_PASSWORD} to {MAX_PASSWORD} characters and no control characters"
            ),
        }
        .into());
    }
    Ok(())
}

/// The caller a console login acts as: `NAME@console`, so that the audit
/// log tells it from an admin credential of the same name.
pub fn console_caller(name: &str) -> Caller {
    Caller::Admin(format!("{name}@console"))
}

/// A password hash's tag: SHA-256 of its PHC string.
fn tag(hash: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(hash.as_bytes()).into()
}

/// A volume's history, from the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VolumeHistory {
    /// When its current key was made (Unix seconds; 0: not known).
    pub key_created: i64,
    /// Its last finished shallow rekey (Unix seconds; 0: none).
    pub last_shallow: i64,
    /// Its last finished deep rekey (Unix seconds; 0: none).
    pub last_deep: i64,
    /// Hosts that were ever sent a key of it, by name.
    pub holders: Vec<String>,
    /// The policy that applies to it.
    pub policy: Option<Policy>,
    /// When that policy makes its next rekey due (0: no policy).
    pub next_due: i64,
    /// Its newest audit records, oldest first.
    pub records: Vec<AuditRecord>,
}

/// The word after `host ` in an audit detail ("sealed to host kvm-1").
fn host_in(detail: &str) -> Option<String> {
    let at = detail.find("host ")? + "host ".len();
    let name: String = detail[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .collect();
    (!name.is_empty()).then_some(name)
}

/// The generation a rekey goes to, and its kind, from a
/// `volume.rekey-requested` detail ("volume v deep, generation 1 -> 2").
fn requested(detail: &str) -> Option<(u64, &'static str)> {
    let kind = if detail.contains(" deep,") {
        "deep"
    } else if detail.contains(" shallow,") {
        "shallow"
    } else {
        return None;
    };
    let to = detail.rsplit("-> ").next()?.trim().parse().ok()?;
    Some((to, kind))
}

/// The generation a finished rekey went to, from a `key.rotated` detail
/// ("volume v generation 1 -> 2").
fn rotated(detail: &str) -> Option<u64> {
    detail.rsplit("-> ").next()?.trim().parse().ok()
}

fn history_of(records: Vec<AuditRecord>) -> VolumeHistory {
    let mut h = VolumeHistory::default();
    let mut kinds = std::collections::HashMap::new();
    let mut holders = std::collections::BTreeSet::new();
    for r in &records {
        match r.action.as_str() {
            "volume.rekey-requested" => {
                if let Some((to, kind)) = requested(&r.detail) {
                    kinds.insert(to, kind);
                }
            }
            "key.rotated" => {
                let at = r.time_ms / 1000;
                match rotated(&r.detail).and_then(|g| kinds.get(&g)) {
                    Some(&"deep") => h.last_deep = at,
                    Some(_) => h.last_shallow = at,
                    None => {}
                }
            }
            "key.released" | "key.pushed" | "volume.encrypted" => {
                if let Some(host) = host_in(&r.detail) {
                    holders.insert(host);
                }
            }
            _ => {}
        }
    }
    h.holders = holders.into_iter().collect();
    h.records = records;
    h
}

impl Core {
    /// Sets (or replaces) the console login `name`.
    pub fn set_console_user(
        &self,
        caller: &Caller,
        name: &str,
        password: &str,
    ) -> Result<(), CoreError> {
        let name = Name::parse("login name", name)?;
        check_password(password)?;
        let mut salt = [0u8; 16];
        getrandom::fill(&mut salt)
            .map_err(|_| CoreError::Internal("the OS random number generator failed".into()))?;
        let salt = SaltString::encode_b64(&salt)
            .map_err(|e| CoreError::Internal(format!("password salt: {e}")))?;
        let hash = hasher()
            .hash_password(password.as_bytes(), &salt)
            .map_err(|e| CoreError::Internal(format!("password hash: {e}")))?
            .to_string();
        self.write(|tx| {
            let replaced = tx.console_user(name.as_str())?.is_some();
            tx.put_console_user(name.as_str(), &hash, now_unix(), &caller.actor())?;
            self.log(
                tx,
                &caller.actor(),
                "console-user.set",
                name.as_str(),
                if replaced {
                    "password replaced"
                } else {
                    "login made"
                },
            )?;
            Ok(())
        })
    }

    /// Removes the console login `name` (its sessions end at their next
    /// request).
    pub fn remove_console_user(&self, caller: &Caller, name: &str) -> Result<(), CoreError> {
        let name = Name::parse("login name", name)?;
        self.write(|tx| {
            if !tx.delete_console_user(name.as_str())? {
                return Err(CoreError::NotFound(format!(
                    "no console login named {name} (see `guestkeyctl console-user list`)"
                )));
            }
            self.log(
                tx,
                &caller.actor(),
                "console-user.removed",
                name.as_str(),
                "",
            )?;
            Ok(())
        })
    }

    /// Console logins: (name, created, by whom), by name.
    pub fn console_users(&self) -> Result<Vec<(String, i64, String)>, CoreError> {
        self.read(|tx| Ok(tx.console_users()?))
    }

    /// Whether `password` is the console login `name`'s: if so, the caller
    /// it acts as (`NAME@console`, never the name of an admin credential)
    /// and the tag of its password (see [`Core::console_login_tag`]). A
    /// name that is no login takes as long to refuse.
    pub fn check_console_login(
        &self,
        name: &str,
        password: &str,
    ) -> Result<Option<(Caller, [u8; 32])>, CoreError> {
        let known = match Name::parse("login name", name) {
            Ok(n) => self.read(|tx| Ok(tx.console_user(n.as_str())?))?,
            Err(_) => None,
        };
        let stored = known.as_deref().unwrap_or_else(|| decoy());
        let ok = PasswordHash::new(stored)
            .map(|h| hasher().verify_password(password.as_bytes(), &h).is_ok())
            .unwrap_or(false);
        Ok(match known {
            Some(hash) if ok => Some((console_caller(name), tag(&hash))),
            _ => None,
        })
    }

    /// The tag of the console login `name`'s current password (None: no
    /// such login): a session made under another password, or before the
    /// login was removed and made again, no longer matches.
    pub fn console_login_tag(&self, name: &str) -> Result<Option<[u8; 32]>, CoreError> {
        self.read(|tx| Ok(tx.console_user(name)?.map(|h| tag(&h))))
    }

    /// What each host last reported holding: (volume id, generation),
    /// ids only, by host.
    pub fn held_keys(&self) -> Result<HashMap<String, Vec<(String, u64)>>, CoreError> {
        self.read(|tx| {
            let mut out = HashMap::new();
            for h in tx.hosts()? {
                let mut held: Vec<(String, u64)> = tx
                    .inventory(&h.name)?
                    .into_iter()
                    .map(|k| (k.volume_id, k.generation))
                    .collect();
                held.dedup();
                out.insert(h.name, held);
            }
            Ok(out)
        })
    }

    /// Records a new session (the expired ones and the oldest beyond
    /// `keep` go first).
    pub fn open_console_session(
        &self,
        s: &ConsoleSession,
        idle_ms: i64,
        lifetime_ms: i64,
        keep: u32,
    ) -> Result<(), CoreError> {
        let now = now_unix_ms();
        self.write(|tx| {
            tx.prune_console_sessions(now - idle_ms, now - lifetime_ms, keep.saturating_sub(1))?;
            tx.insert_console_session(s)?;
            Ok(())
        })
    }

    /// The session of this token hash, if it still counts: (login, CSRF
    /// token). One idle for `idle_ms`, signed in `lifetime_ms` ago, or
    /// made under another password of its login (or before the login was
    /// removed) ends here.
    pub fn console_session_check(
        &self,
        token_hash: &[u8],
        idle_ms: i64,
        lifetime_ms: i64,
    ) -> Result<Option<(String, String)>, CoreError> {
        let now = now_unix_ms();
        let (session, current) = self.read(|tx| {
            let Some(s) = tx.console_session(token_hash)? else {
                return Ok((None, None));
            };
            let current = tx.console_user(&s.login)?.map(|h| tag(&h));
            Ok((Some(s), current))
        })?;
        let Some(s) = session else { return Ok(None) };
        let counts = now - s.last_ms < idle_ms
            && now - s.started_ms < lifetime_ms
            && current.is_some_and(|t| t.as_slice() == s.tag.as_slice());
        if !counts {
            self.write(|tx| Ok(tx.delete_console_session(token_hash)?))?;
            return Ok(None);
        }
        // Written at most every half minute: a page's reloads every two
        // seconds need no write each.
        if now - s.last_ms > 30_000 {
            self.write(|tx| Ok(tx.touch_console_session(token_hash, now)?))?;
        }
        Ok(Some((s.login, s.csrf)))
    }

    /// Ends a session.
    pub fn close_console_session(&self, token_hash: &[u8]) -> Result<(), CoreError> {
        self.write(|tx| Ok(tx.delete_console_session(token_hash)?))?;
        Ok(())
    }

    /// The newest `limit` audit records about `subject`, oldest first.
    pub fn audit_of(&self, subject: &str, limit: u32) -> Result<Vec<AuditRecord>, CoreError> {
        self.read(|tx| Ok(tx.audit_of(subject, limit)?))
    }

    /// Records a sign-in to the console.
    pub fn audit_console_login(&self, name: &str) -> Result<(), CoreError> {
        self.write(|tx| {
            self.log(
                tx,
                &console_caller(name).actor(),
                "console.signed-in",
                name,
                "",
            )?;
            Ok(())
        })
    }

    /// Whether the console login `name` exists.
    pub fn console_user_exists(&self, name: &str) -> Result<bool, CoreError> {
        Ok(self.console_login_tag(name)?.is_some())
    }

    /// A volume and its history from the audit log.
    pub fn volume_history(
        &self,
        name_or_id: &str,
    ) -> Result<(VolumeInfo, VolumeHistory), CoreError> {
        let v = self.get_volume(name_or_id)?;
        let (records, created, policy) = self.read(|tx| {
            Ok((
                tx.audit_of(&v.id, HISTORY)?,
                tx.key_created(&v.id, v.key_generation)?,
                tx.policy_for(&v.id, &v.pool)?,
            ))
        })?;
        let mut h = history_of(records);
        h.key_created = created.unwrap_or(0);
        if let Some(p) = &policy {
            h.next_due = h
                .key_created
                .saturating_add(i64::try_from(p.max_key_age_secs).unwrap_or(i64::MAX));
        }
        if v.rekey_due_unix > 0 && (h.next_due == 0 || v.rekey_due_unix < h.next_due) {
            h.next_due = v.rekey_due_unix;
        }
        h.policy = policy;
        Ok((v, h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(action: &str, detail: &str, secs: i64) -> AuditRecord {
        AuditRecord {
            seq: 0,
            time_ms: secs * 1000,
            actor: "server".into(),
            action: action.into(),
            subject: "v".into(),
            detail: detail.into(),
            prev_hash: String::new(),
            hash: String::new(),
            mac: String::new(),
        }
    }

    #[test]
    fn a_volume_history_is_read_from_its_records() {
        let h = history_of(vec![
            rec("key.pushed", "volume v created on host kvm-1", 10),
            rec(
                "key.released",
                "generation 1 sealed to host kvm-2 (start)",
                20,
            ),
            rec(
                "volume.rekey-requested",
                "volume v deep, generation 1 -> 2",
                30,
            ),
            rec("key.rotated", "volume v generation 1 -> 2", 40),
            rec(
                "volume.rekey-requested",
                "volume v shallow, generation 2 -> 3",
                50,
            ),
            rec("key.rotated", "volume v generation 2 -> 3", 60),
            rec(
                "volume.rekey-requested",
                "volume v deep, generation 3 -> 4",
                70,
            ),
        ]);
        assert_eq!((h.last_deep, h.last_shallow), (40, 60));
        assert_eq!(h.holders, ["kvm-1", "kvm-2"]);
    }

    #[test]
    fn bad_passwords_are_refused_without_showing_them() {
        for p in [
            "short",
            "eleven chrs",
            "a\u{7}bcdefghijklmnop",
            &"x".repeat(1025),
        ] {
            let e = check_password(p).unwrap_err().to_string();
            assert!(e.contains("12 to 1024 characters"), "{e}");
            assert!(p.len() < 5 || !e.contains(p), "{e}");
        }
        check_password("twelve chars").unwrap();
    }
}
