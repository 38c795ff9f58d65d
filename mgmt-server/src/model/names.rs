//! Validated names, sizes, addresses, URIs and durations: input from the
//! CLI and the admin API becomes these types at the edge, with an error
//! that says what to fix.

use std::fmt;

/// Why a name or size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {why}")]
pub struct InvalidInput {
    /// What kind of input.
    pub what: &'static str,
    /// The value given (names are not secret).
    pub value: String,
    /// What is wrong and what is allowed.
    pub why: String,
}

const NAME_RULE: &str =
    "use 1 to 64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit";

/// A host, volume or pool name: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`, never
/// `..`-containing, so it is safe in paths, libvirt names and logs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

impl Name {
    /// Validates `value` as a name of kind `what` (used in the error).
    pub fn parse(what: &'static str, value: &str) -> Result<Self, InvalidInput> {
        let bad = |why: &str| InvalidInput {
            what,
            value: value.to_owned(),
            why: why.to_owned(),
        };
        if value.is_empty() {
            return Err(bad("it is empty"));
        }
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        let first_ok = value
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
        if value.len() > 64 || !first_ok || !value.chars().all(ok_char) {
            return Err(bad(NAME_RULE));
        }
        if value.contains("..") {
            return Err(bad("it must not contain `..`"));
        }
        Ok(Self(value.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Largest volume guestkey creates: 1 PiB.
pub const MAX_CAPACITY: u64 = 1 << 50;

/// Unix seconds as UTC, `2026-12-01 09:30:00Z` (None: out of range).
pub fn format_utc(unix: i64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(unix).ok()?;
    Some(format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    ))
}

/// Parses a size: a whole number of bytes, optionally with a binary suffix
/// K, M, G, T or P (also KiB, MiB...). `10G` is 10 GiB.
pub fn parse_size(value: &str) -> Result<u64, InvalidInput> {
    let bad = |why: &str| InvalidInput {
        what: "size",
        value: value.to_owned(),
        why: why.to_owned(),
    };
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, suffix) = v.split_at(split);
    if digits.is_empty() {
        return Err(bad(
            "give a whole number of bytes, optionally with K, M, G, T or P (e.g. 10G)",
        ));
    }
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KIB" => 10,
        "M" | "MIB" => 20,
        "G" | "GIB" => 30,
        "T" | "TIB" => 40,
        "P" | "PIB" => 50,
        _ => return Err(bad("the unit must be K, M, G, T or P (powers of 1024)")),
    };
    let n: u64 = digits.parse().map_err(|_| bad("the number is too large"))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .filter(|b| *b <= MAX_CAPACITY)
        .ok_or_else(|| bad("larger than the 1P maximum"))?;
    if bytes == 0 {
        return Err(bad("a volume needs at least 1 byte"));
    }
    Ok(bytes)
}

/// A `HOST:PORT` address of a host daemon.
pub fn parse_address(value: &str) -> Result<String, InvalidInput> {
    let bad = |why: &str| InvalidInput {
        what: "address",
        value: value.to_owned(),
        why: why.to_owned(),
    };
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| bad("use HOST:PORT, e.g. 127.0.0.1:7444"))?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host_ok = host.parse::<std::net::IpAddr>().is_ok()
        || (!host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            }));
    if !host_ok {
        return Err(bad("the host must be an IP address or a DNS name"));
    }
    Ok(value.to_owned())
}

/// Checks a libvirt connection URI (`qemu[+transport]://…/system|session`).
pub fn parse_libvirt_uri(value: &str) -> Result<String, InvalidInput> {
    let bad = |why: &str| InvalidInput {
        what: "libvirt URI",
        value: value.to_owned(),
        why: why.to_owned(),
    };
    let (scheme, rest) = value
        .split_once("://")
        .ok_or_else(|| bad("use e.g. qemu+tls://host2.example/system"))?;
    if scheme != "qemu" && !scheme.starts_with("qemu+") {
        return Err(bad(
            "guestkey migrates QEMU guests: the scheme must be qemu or qemu+TRANSPORT",
        ));
    }
    if value.len() > 1024 || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("no spaces or control characters, at most 1024 bytes"));
    }
    if !(rest.contains("/system") || rest.contains("/session")) {
        return Err(bad("the path must be /system or /session"));
    }
    Ok(value.to_owned())
}

/// Checks a QEMU migration URI (`tcp://HOST[:PORT]`, `tcp:HOST:PORT`,
/// `rdma://…`), or "" for libvirt's default.
pub fn parse_migration_uri(value: &str) -> Result<String, InvalidInput> {
    if value.is_empty() {
        return Ok(String::new());
    }
    let ok = (value.starts_with("tcp:") || value.starts_with("rdma:"))
        && value.len() <= 1024
        && !value.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(value.to_owned())
    } else {
        Err(InvalidInput {
            what: "migration URI",
            value: value.to_owned(),
            why: "use tcp://HOST:PORT (or leave it empty for libvirt's default)".into(),
        })
    }
}

/// Parses a duration: a whole number with s, m, h or d (e.g. `90d`).
pub fn parse_duration(value: &str) -> Result<u64, InvalidInput> {
    let bad = |why: &str| InvalidInput {
        what: "duration",
        value: value.to_owned(),
        why: why.to_owned(),
    };
    let v = value.trim();
    let (num, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| bad("give a whole number with s, m, h or d, e.g. 90d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad("the unit must be s, m, h or d, e.g. 90d")),
    };
    match n.checked_mul(mult) {
        Some(0) => Err(bad("must be longer than 0")),
        Some(s) if s <= 100 * 365 * 86_400 => Ok(s),
        _ => Err(bad("at most 100 years")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "kvm-01", "vm1.disk_0", &"x".repeat(64)] {
            assert!(Name::parse("volume name", ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("a/b", "A-Z"),
            ("..", "A-Z"),
            ("a..b", "`..`"),
            ("-a", "starting"),
            (".hidden", "starting"),
            ("a b", "A-Z"),
            ("é", "A-Z"),
            (&"x".repeat(65), "64"),
        ] {
            let e = Name::parse("volume name", bad).unwrap_err();
            assert!(e.to_string().starts_with("invalid volume name"), "{e}");
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn sizes() {
        for (s, n) in [
            ("1", 1),
            ("512M", 512 << 20),
            ("10G", 10 << 30),
            ("2 GiB", 2 << 30),
            ("1P", 1 << 50),
            ("16m", 16 << 20),
        ] {
            assert_eq!(parse_size(s).unwrap(), n, "{s}");
        }
        for (s, why) in [
            ("-1", "whole number"),
            ("1Z", "unit"),
            ("99999999999T", "maximum"),
            ("0", "at least"),
            ("", "whole number"),
            ("G", "whole number"),
            ("184467440737095516160", "too large"),
            ("2P", "maximum"),
        ] {
            let e = parse_size(s).unwrap_err();
            assert!(e.to_string().contains(why), "{s}: {e}");
        }
    }

    #[test]
    fn addresses() {
        for ok in ["127.0.0.1:7444", "kvm-01.example:7444", "[::1]:7444"] {
            assert!(parse_address(ok).is_ok(), "{ok}");
        }
        for bad in [
            "127.0.0.1",
            "host:0",
            "host:99999",
            ":7444",
            "a/b:1",
            "a..b:1",
        ] {
            assert!(parse_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn uris() {
        assert!(parse_libvirt_uri("qemu+tls://h2.example/system").is_ok());
        assert!(
            parse_libvirt_uri("qemu+unix:///session?socket=/home/u/.cache/libvirt/libvirt-sock")
                .is_ok()
        );
        for bad in [
            "",
            "h2",
            "xen://h/system",
            "qemu+tls://h2/",
            "qemu://h /system",
        ] {
            assert!(parse_libvirt_uri(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_migration_uri("").unwrap(), "");
        assert!(parse_migration_uri("tcp://127.0.0.1:49152").is_ok());
        assert!(parse_migration_uri("http://x").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90d").unwrap(), 90 * 86_400);
        assert_eq!(parse_duration("2s").unwrap(), 2);
        assert_eq!(parse_duration("12h").unwrap(), 43_200);
        for bad in ["", "d", "-1d", "0s", "5y", "1.5d", "999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
