//! Recovery shares: the recovery key of the server, split among custodians.
//!
//! The recovery key is an age X25519 identity made at `recovery split`
//! (or `init --recovery-shares`). Its public half, the recipient, stays in
//! the database: the master key and the data directory's keys are sealed to
//! it there, and re-sealed by a master key rotation without the private
//! half. The private half exists only while the split is made and while
//! `recover` runs: it is cut with Shamir's secret sharing (`blahaj`, the
//! maintained fork of `sharks`) into N shares of which any M give it back
//! and M-1 say nothing about it. Each share is a short text, age-encrypted
//! to one custodian:
//!
//! ```text
//! guestkey-recovery-share v1
//! split: 5f0c...           (the split's id, the same in every share)
//! recipient: age1...       (the recovery key's public half)
//! threshold: 2
//! shares: 3
//! index: 1                 (1 to N, the share's x)
//! custodian: age1...       (who it was encrypted to)
//! created: 1796371200      (Unix seconds)
//! share: BASE64            (x, then the share's bytes)
//! ```
//!
//! Combining checks what the text claims: one split, one recipient, as many
//! distinct indexes as the threshold, and the combined key's public half
//! equal to the recipient (so an altered or forged share is refused rather
//! than giving a wrong key).
//!
//! A leaf module: imports nothing of this crate.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use secrecy::ExposeSecret;
use zeroize::Zeroizing;

/// The first line of a share's text.
pub const SHARE_MAGIC: &str = "guestkey-recovery-share v1";

/// The most shares of one split (Shamir over GF(256) has 255 points).
pub const MAX_SHARES: u8 = 255;

/// age encrypts in chunks of this many bytes.
const AGE_CHUNK: usize = 64 << 10;

/// The longest text sealed here (a share, the master key, the bundle).
pub const MAX_TEXT: usize = AGE_CHUNK - 1;

/// Why shares could not be made, read or combined.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ShareError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ShareError> {
    Err(ShareError(msg.into()))
}

/// The recovery key: an age X25519 identity. Not `Clone`, no `Debug`;
/// wiped on drop (age's identity wipes its scalar).
pub struct RecoveryKey(age::x25519::Identity);

impl RecoveryKey {
    /// A new random recovery key.
    pub fn generate() -> Self {
        Self(age::x25519::Identity::generate())
    }

    /// Its public half, `age1...`.
    pub fn recipient(&self) -> String {
        self.0.to_public().to_string()
    }

    /// The identity, to open what was sealed to [`Self::recipient`].
    pub fn identity(&self) -> &age::x25519::Identity {
        &self.0
    }

    /// Cuts the key into `n` shares of which any `m` give it back; the
    /// shares' texts (to be sealed to their custodians), in index order.
    pub fn split(&self, split: &SplitInfo) -> Result<Vec<Zeroizing<String>>, ShareError> {
        split.check()?;
        let secret = self.0.to_string();
        let dealer = blahaj::Sharks(split.threshold).dealer(secret.expose_secret().as_bytes());
        let mut out = Vec::with_capacity(split.custodians.len());
        for (i, share) in dealer.take(split.custodians.len()).enumerate() {
            let bytes = Zeroizing::new(Vec::<u8>::from(&share));
            let mut text = Zeroizing::new(String::with_capacity(1024));
            let s = &mut *text;
            let _ = writeln!(s, "{SHARE_MAGIC}");
            let _ = writeln!(s, "split: {}", split.split_id);
            let _ = writeln!(s, "recipient: {}", split.recipient);
            let _ = writeln!(s, "threshold: {}", split.threshold);
            let _ = writeln!(s, "shares: {}", split.custodians.len());
            let _ = writeln!(s, "index: {}", i + 1);
            let _ = writeln!(s, "custodian: {}", split.custodians[i]);
            let _ = writeln!(s, "created: {}", split.created);
            s.push_str("share: ");
            B64.encode_string(bytes.as_slice(), s);
            s.push('\n');
            out.push(text);
        }
        Ok(out)
    }
}

/// What every share of a split says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitInfo {
    /// The split's id.
    pub split_id: String,
    /// The recovery key's public half.
    pub recipient: String,
    /// Shares needed (M).
    pub threshold: u8,
    /// The custodians' recipients, one share each (N of them).
    pub custodians: Vec<String>,
    /// When the split was made.
    pub created: i64,
}

impl SplitInfo {
    fn check(&self) -> Result<(), ShareError> {
        let n = self.custodians.len();
        if self.threshold < 2 || n > usize::from(MAX_SHARES) || usize::from(self.threshold) > n {
            return err(format!(
                "{}-of-{n}: give M-of-N with 2 <= M <= N <= {MAX_SHARES} (one share cannot be a custodian's secret alone)",
                self.threshold
            ));
        }
        Ok(())
    }
}

/// `M-of-N` as `init --recovery-shares` takes it.
pub fn parse_m_of_n(text: &str) -> Result<(u8, u8), ShareError> {
    let bad = || {
        ShareError(format!(
            "--recovery-shares {text:?}: give M-of-N, e.g. 2-of-3 (2 <= M <= N <= {MAX_SHARES})"
        ))
    };
    let (m, n) = text.trim().split_once("-of-").ok_or_else(bad)?;
    let m: u8 = m.parse().map_err(|_| bad())?;
    let n: u8 = n.parse().map_err(|_| bad())?;
    if m < 2 || m > n {
        return Err(bad());
    }
    Ok((m, n))
}

/// One age X25519 recipient (`age1...`), canonical.
pub fn parse_recipient(text: &str) -> Result<age::x25519::Recipient, ShareError> {
    if text
        .trim()
        .to_ascii_uppercase()
        .starts_with("AGE-SECRET-KEY-")
    {
        // Never echoed: it is someone's private key.
        return err(
            "an age identity (AGE-SECRET-KEY-...) was given where a recipient belongs: give its public key, which `age-keygen -y IDENTITY_FILE` prints (age1...), and keep the identity secret",
        );
    }
    age::x25519::Recipient::from_str(text).map_err(|e| {
        ShareError(format!(
            "{:?} is not an age X25519 recipient ({e}): give the public key `age-keygen -y IDENTITY_FILE` prints (age1...)",
            text.chars().take(80).collect::<String>()
        ))
    })
}

/// A share read back: what it says, and its point.
pub struct Share {
    /// The split it says it is of.
    pub info: SplitInfo,
    /// Its index (1 to N).
    pub index: u8,
    /// How many shares the split made.
    pub shares: u8,
    point: blahaj::Share,
}

impl Share {
    /// Reads a share's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ShareError> {
        let bad = |what: &str| ShareError(format!("{origin}: {what}"));
        // `age -d` prints the zeros a sealed share is padded with.
        let mut lines = text.trim_end_matches('\0').lines();
        if lines.next().map(str::trim) != Some(SHARE_MAGIC) {
            return Err(bad(&format!(
                "not a guestkey recovery share (it does not begin with {SHARE_MAGIC:?})"
            )));
        }
        let mut fields: Vec<(&str, &str)> = vec![];
        for line in lines {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let (k, v) = line
                .split_once(": ")
                .ok_or_else(|| bad("a line is not NAME: VALUE"))?;
            if fields.iter().any(|(seen, _)| *seen == k) {
                return Err(bad(&format!("{k} is given twice")));
            }
            fields.push((k, v.trim()));
        }
        let get = |k: &str| {
            fields
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| *v)
                .ok_or_else(|| bad(&format!("no {k} line")))
        };
        let number = |k: &str| -> Result<u8, ShareError> {
            get(k)?
                .parse()
                .map_err(|_| bad(&format!("{k} is not a number from 1 to {MAX_SHARES}")))
        };
        let split_id = get("split")?;
        if split_id.is_empty()
            || split_id.len() > 64
            || !split_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(bad("the split id is not one guestkey makes"));
        }
        let recipient = parse_recipient(get("recipient")?)
            .map_err(|e| bad(&e.0))?
            .to_string();
        let custodian = parse_recipient(get("custodian")?)
            .map_err(|e| bad(&e.0))?
            .to_string();
        let threshold = number("threshold")?;
        let shares = number("shares")?;
        let index = number("index")?;
        if threshold < 2 || threshold > shares || index == 0 || index > shares {
            return Err(bad(&format!(
                "threshold {threshold}, shares {shares} and index {index} do not fit together"
            )));
        }
        let created: i64 = get("created")?
            .parse()
            .map_err(|_| bad("created is not a Unix time"))?;
        let bytes = Zeroizing::new(
            B64.decode(get("share")?)
                .map_err(|_| bad("the share line is not base64"))?,
        );
        let point = blahaj::Share::try_from(bytes.as_slice())
            .map_err(|_| bad("the share line is too short"))?;
        if point.x.0 != index {
            return Err(bad(&format!(
                "the share line is of index {}, not {index}: it was altered",
                point.x.0
            )));
        }
        Ok(Self {
            info: SplitInfo {
                split_id: split_id.to_owned(),
                recipient,
                threshold,
                custodians: vec![custodian],
                created,
            },
            index,
            shares,
            point,
        })
    }
}

/// Gives the recovery key back from `shares`, or says why not: shares of
/// different splits, an index twice, fewer than the threshold, or a
/// combination that is not the key the shares name (a share was altered).
pub fn combine(shares: &[Share]) -> Result<RecoveryKey, ShareError> {
    let Some(first) = shares.first() else {
        return err("give the shares (--share FILE, at least M of them)");
    };
    for s in shares {
        if s.info.split_id != first.info.split_id || s.info.recipient != first.info.recipient {
            return err(format!(
                "the shares are of different splits ({} and {}): give shares of one split only",
                first.info.split_id, s.info.split_id
            ));
        }
        if s.info.threshold != first.info.threshold || s.shares != first.shares {
            return err(format!(
                "the shares of split {} disagree on M-of-N: one was altered",
                first.info.split_id
            ));
        }
    }
    let mut seen = [false; 256];
    for s in shares {
        if std::mem::replace(&mut seen[usize::from(s.index)], true) {
            return err(format!(
                "share {} of split {} is given twice: give {} different shares",
                s.index, first.info.split_id, first.info.threshold
            ));
        }
    }
    let m = first.info.threshold;
    if shares.len() < usize::from(m) {
        return err(format!(
            "{} share(s) of split {} given, {m} needed ({m}-of-{}): nothing was recovered",
            shares.len(),
            first.info.split_id,
            first.shares
        ));
    }
    let points: Vec<&blahaj::Share> = shares.iter().map(|s| &s.point).collect();
    let secret = Zeroizing::new(
        blahaj::Sharks(m)
            .recover(points)
            .map_err(|e| ShareError(format!("the shares do not combine: {e}")))?,
    );
    let wrong = || {
        ShareError(format!(
            "the shares of split {} do not combine into its recovery key {}: one of them was altered or forged",
            first.info.split_id, first.info.recipient
        ))
    };
    let text = std::str::from_utf8(&secret).map_err(|_| wrong())?;
    let identity = age::x25519::Identity::from_str(text).map_err(|_| wrong())?;
    if identity.to_public().to_string() != first.info.recipient {
        return Err(wrong());
    }
    Ok(RecoveryKey(identity))
}

/// Encrypts `text` (at most [`MAX_TEXT`] bytes, no NUL) to `recipients`.
pub fn seal(text: &str, recipients: &[age::x25519::Recipient]) -> Result<Vec<u8>, ShareError> {
    if text.len() > MAX_TEXT || text.contains('\0') {
        return err("the text to seal is too long");
    }
    let e = age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
        .map_err(|e| ShareError(format!("age: {e}")))?;
    let mut out = vec![];
    let mut w = e
        .wrap_output(&mut out)
        .map_err(|e| ShareError(format!("age: {e}")))?;
    // age keeps a chunk's plaintext in a buffer it frees unwiped: zeros up
    // to two whole chunks make the second chunk overwrite the text there.
    // `open` drops them.
    let padding = vec![0u8; 2 * AGE_CHUNK - text.len()];
    w.write_all(text.as_bytes())
        .and_then(|()| w.write_all(&padding))
        .and_then(|()| w.finish().map(drop))
        .map_err(|e| ShareError(format!("age: {e}")))?;
    Ok(out)
}

/// Whether `data` looks like an age file (binary or armored).
pub fn is_age(data: &[u8]) -> bool {
    data.starts_with(b"age-encryption.org/v1") || data.starts_with(b"-----BEGIN AGE")
}

/// Opens what [`seal`] made with one of `identities`; `what` names it in
/// errors.
pub fn open(
    data: &[u8],
    identities: &[&dyn age::Identity],
    what: &str,
) -> Result<Zeroizing<String>, ShareError> {
    // Binary or ASCII-armored (`age -a`): the reader tells them apart.
    let d = age::Decryptor::new_buffered(age::armor::ArmoredReader::new(data))
        .map_err(|e| ShareError(format!("{what} is not age-encrypted ({e})")))?;
    if d.is_scrypt() {
        return err(format!(
            "{what} is encrypted to a passphrase, not to recipients: not guestkey's"
        ));
    }
    let mut r = d.decrypt(identities.iter().copied()).map_err(|e| match e {
        age::DecryptError::NoMatchingKeys => ShareError(format!(
            "none of the identities given opens {what}: give the identity file of its recipient"
        )),
        other => ShareError(format!(
            "{what} does not open ({other}): it was altered or damaged"
        )),
    })?;
    // One buffer, never grown (a grown one would be freed unwiped).
    let cap = 2 * AGE_CHUNK + 1;
    let mut plain = Zeroizing::new(Vec::with_capacity(cap));
    (&mut r)
        .take(cap as u64)
        .read_to_end(&mut plain)
        .map_err(|e| {
            ShareError(format!(
                "{what} does not open ({e}): it was altered or damaged"
            ))
        })?;
    if plain.len() >= cap {
        return err(format!("{what} is too long: not guestkey's"));
    }
    let text = std::str::from_utf8(&plain)
        .map_err(|_| ShareError(format!("{what} is not text: not guestkey's")))?
        .trim_end_matches('\0');
    let mut out = Zeroizing::new(String::with_capacity(text.len()));
    out.push_str(text);
    Ok(out)
}

/// The identities of an age identity file's contents.
pub fn read_identities(
    data: &[u8],
    origin: &str,
) -> Result<Vec<Box<dyn age::Identity + Send + Sync>>, ShareError> {
    let ids = age::IdentityFile::from_buffer(data)
        .and_then(|f| f.into_identities().map_err(std::io::Error::other))
        .map_err(|e| ShareError(format!("{origin} is not an age identity file: {e}")))?;
    if ids.is_empty() {
        return err(format!("{origin} holds no age identity"));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn custodians(n: usize) -> (Vec<age::x25519::Identity>, Vec<String>) {
        let ids: Vec<_> = (0..n).map(|_| age::x25519::Identity::generate()).collect();
        let r = ids.iter().map(|i| i.to_public().to_string()).collect();
        (ids, r)
    }

    fn info(key: &RecoveryKey, m: u8, custodians: Vec<String>) -> SplitInfo {
        SplitInfo {
            split_id: "split-1".into(),
            recipient: key.recipient(),
            threshold: m,
            custodians,
            created: 1_796_371_200,
        }
    }

    fn parsed(texts: &[Zeroizing<String>], pick: &[usize]) -> Vec<Share> {
        pick.iter()
            .map(|&i| Share::parse(&texts[i], &format!("share {i}")).unwrap())
            .collect()
    }

    #[test]
    fn any_m_shares_give_the_key_back_and_fewer_do_not() {
        let key = RecoveryKey::generate();
        let (_, c) = custodians(5);
        let texts = key.split(&info(&key, 3, c)).unwrap();
        assert_eq!(texts.len(), 5);
        for pick in [[0, 1, 2], [4, 2, 0], [1, 3, 4]] {
            let back = combine(&parsed(&texts, &pick)).unwrap();
            assert_eq!(back.recipient(), key.recipient());
        }
        // All five work too.
        assert!(combine(&parsed(&texts, &[0, 1, 2, 3, 4])).is_ok());
        let e = combine(&parsed(&texts, &[0, 1])).err().unwrap().0;
        assert!(e.contains("2 share(s)") && e.contains("3 needed"), "{e}");
        // The same share twice does not count twice.
        let e = combine(&parsed(&texts, &[0, 1, 1])).err().unwrap().0;
        assert!(e.contains("given twice"), "{e}");
        assert!(combine(&[]).is_err());
    }

    #[test]
    fn shares_of_two_splits_or_altered_ones_are_refused() {
        let key = RecoveryKey::generate();
        let (_, c) = custodians(3);
        let a = key.split(&info(&key, 2, c.clone())).unwrap();
        let mut other = info(&key, 2, c);
        other.split_id = "split-2".into();
        let b = key.split(&other).unwrap();
        let mut mixed = parsed(&a, &[0]);
        mixed.extend(parsed(&b, &[1]));
        let e = combine(&mixed).err().unwrap().0;
        assert!(e.contains("different splits"), "{e}");

        // A flipped bit in a share's point: the combination is not the key.
        let line = a[1].lines().find(|l| l.starts_with("share: ")).unwrap();
        let mut bytes = B64.decode(&line[7..]).unwrap();
        bytes[5] ^= 1;
        let altered = a[1].replace(line, &format!("share: {}", B64.encode(&bytes)));
        let mut shares = parsed(&a, &[0]);
        shares.push(Share::parse(&altered, "altered").unwrap());
        let e = combine(&shares).err().unwrap().0;
        assert!(e.contains("altered or forged"), "{e}");

        // Index and point disagree: refused when read.
        let moved = a[1].replace("index: 2", "index: 3");
        let e = Share::parse(&moved, "moved").err().unwrap().0;
        assert!(e.contains("altered"), "{e}");
        // Not a share at all; a field twice; a bad recipient.
        for (text, want) in [
            ("hello", "not a guestkey recovery share"),
            (
                &*a[0].replace("split: split-1", "split: split-1\nsplit: x"),
                "twice",
            ),
            (
                &*a[0].replace("recipient: age1", "recipient: age2"),
                "age X25519",
            ),
            (&*a[0].replace("threshold: 2", "threshold: 9"), "do not fit"),
        ] {
            let e = Share::parse(text, "f").err().unwrap().0;
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn sealed_text_opens_only_with_its_identity() {
        let key = RecoveryKey::generate();
        let sealed = seal("hello", &[parse_recipient(&key.recipient()).unwrap()]).unwrap();
        assert!(is_age(&sealed));
        let opened = open(&sealed, &[key.identity()], "x").unwrap();
        assert_eq!(opened.as_str(), "hello");
        let other = age::x25519::Identity::generate();
        let e = open(&sealed, &[&other], "the packet").err().unwrap().0;
        assert!(e.contains("none of the identities"), "{e}");
        let mut bad = sealed.clone();
        let n = bad.len();
        bad[n - 20] ^= 1;
        assert!(open(&bad, &[key.identity()], "x").is_err());
    }

    #[test]
    fn m_of_n_is_checked() {
        assert_eq!(parse_m_of_n("2-of-3").unwrap(), (2, 3));
        for bad in ["1-of-3", "3-of-2", "2of3", "a-of-b", "2-of-256", ""] {
            assert!(parse_m_of_n(bad).is_err(), "{bad}");
        }
        let key = RecoveryKey::generate();
        let (_, c) = custodians(1);
        assert!(key.split(&info(&key, 2, c)).is_err());
    }
}
