//! The host daemon's domain types: names, UUIDs, formats, guest states and
//! the registry entry of a volume. The bottom layer: it imports nothing of
//! this crate, and every other module may use it. Values from outside
//! (gRPC requests, the hook socket, libvirt) become these types at the
//! edge, where a bad value is refused with a message naming it.

use serde::{Deserialize, Serialize};

pub use xdr_wipe::packet::VolumeId;

/// A request value that was refused at the edge; the message names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidInput(pub String);

/// Container format of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// qcow2 with LUKS inside.
    Qcow2,
    /// Raw LUKS.
    Raw,
}

impl Format {
    /// The name QEMU and libvirt use (`qcow2`, `raw`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
        }
    }

    /// The format a key packet names.
    pub fn of_packet(f: xdr_wipe::packet::VolumeFormat) -> Self {
        match f {
            xdr_wipe::packet::VolumeFormat::Qcow2 => Self::Qcow2,
            xdr_wipe::packet::VolumeFormat::Raw => Self::Raw,
        }
    }
}

/// A pool or volume name: it appears in file names and libvirt calls, so
/// only `A-Z a-z 0-9 . _ -`, not starting with `.`, no `..`, at most 255
/// bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

impl Name {
    /// Checks `value` as a `what` (e.g. "pool name").
    pub fn parse(what: &str, value: &str) -> Result<Self, InvalidInput> {
        let ok = !value.is_empty()
            && value.len() <= 255
            && !value.contains("..")
            && !value.starts_with('.')
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if ok {
            Ok(Self(value.to_owned()))
        } else {
            Err(InvalidInput(format!(
                "invalid {what} {value:?}: use A-Z a-z 0-9 . _ - (not starting with `.`, no `..`, at most 255 bytes)"
            )))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A UUID written the one way libvirt and guestkey write it: lower-case
/// hex in 8-4-4-4-12 groups. Other spellings that a UUID parser would
/// accept (upper case, no dashes, braces, URN) are refused, so that two
/// readers comparing text can never disagree about which object is meant.
pub fn canonical_uuid(what: &str, value: &str) -> Result<uuid::Uuid, InvalidInput> {
    match uuid::Uuid::try_parse(value) {
        Ok(u) if u.hyphenated().to_string() == value => Ok(u),
        Ok(_) => Err(InvalidInput(format!(
            "{what} {value:?} is not in canonical form: write it as xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx in lower case"
        ))),
        Err(_) => Err(InvalidInput(format!("{what} {value:?} is not a UUID"))),
    }
}

/// A volume id from a request (canonical UUID).
pub fn volume_id(value: &str) -> Result<VolumeId, InvalidInput> {
    canonical_uuid("volume id", value).map(VolumeId)
}

/// A libvirt domain's state, in virsh's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainState {
    /// `running`
    Running,
    /// `idle`
    Idle,
    /// `paused`
    Paused,
    /// `in shutdown`
    InShutdown,
    /// `shut off`
    ShutOff,
    /// `crashed`
    Crashed,
    /// `pmsuspended`
    PmSuspended,
    /// `no state`
    NoState,
}

impl DomainState {
    /// virsh's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Idle => "idle",
            Self::Paused => "paused",
            Self::InShutdown => "in shutdown",
            Self::ShutOff => "shut off",
            Self::Crashed => "crashed",
            Self::PmSuspended => "pmsuspended",
            Self::NoState => "no state",
        }
    }

    /// Whether QEMU holds the guest's disks open (it runs or is paused).
    pub fn holds_disks(self) -> bool {
        matches!(self, Self::Running | Self::Paused | Self::Idle)
    }
}

/// A rekey's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RekeyKind {
    /// A new passphrase in a new keyslot; the old keyslot erased.
    Shallow,
    /// A new data key: the data rewritten under it.
    Deep,
}

/// Where a rekey may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Online if a guest runs on the volume, offline otherwise.
    Any,
    /// Only while its guest runs.
    Online,
    /// Only while no guest runs on it.
    Offline,
}

/// A volume created on (or migrated to) this host. Holds no key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeEntry {
    /// Volume id.
    pub volume_id: String,
    /// libvirt volume name.
    pub name: String,
    /// Pool.
    pub pool: String,
    /// Path on this host.
    pub path: String,
    /// libvirt secret UUID for its key.
    pub secret_uuid: String,
}

/// Where the online copy of the image at `path` under key `generation`
/// is made, before it replaces the image: in the pool directory's staging
/// directory `.guestkey` (root's, mode 0711), named by the generation, so
/// that the copy of one rekey is never taken for another's (a running
/// guest's disk keeps the name of the copy it pivoted to until it
/// restarts).
pub fn copy_path(path: &str, generation: u64) -> String {
    match path.rsplit_once('/') {
        Some((dir, name)) => format!("{dir}/.guestkey/{name}.g{generation}"),
        None => format!(".guestkey/{path}.g{generation}"),
    }
}

/// Whether `file` is an online copy of the image at `path` (of any
/// generation, or one an older guestkeyd made).
pub fn is_copy_of(file: &str, path: &str) -> bool {
    let staged = match path.rsplit_once('/') {
        Some((dir, name)) => format!("{dir}/.guestkey/{name}.g"),
        None => return false,
    };
    file == legacy_copy_path(path)
        || file
            .strip_prefix(&staged)
            .is_some_and(|g| !g.is_empty() && g.bytes().all(|b| b.is_ascii_digit()))
}

/// Where copies were made before guestkeyd used a staging directory (a
/// running guest rekeyed online by an older guestkeyd still names it).
pub fn legacy_copy_path(path: &str) -> String {
    format!("{path}.gk-rekey")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_uuids_are_checked_at_the_edge() {
        for ok in ["a", "vm1.disk_0", "pool-1"] {
            assert!(Name::parse("volume name", ok).is_ok(), "{ok}");
        }
        for bad in ["", ".x", "a/b", "a..b", "a b", "é", &"x".repeat(256)] {
            let e = Name::parse("volume name", bad).unwrap_err().to_string();
            assert!(e.starts_with("invalid volume name"), "{e}");
        }
        let u = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        assert!(canonical_uuid("guest", u).is_ok());
        for bad in [
            "1B4E28BA-2FA1-11D2-883F-0016D3CCA427",
            "1b4e28ba2fa111d2883f0016d3cca427",
            "{1b4e28ba-2fa1-11d2-883f-0016d3cca427}",
            "urn:uuid:1b4e28ba-2fa1-11d2-883f-0016d3cca427",
            " 1b4e28ba-2fa1-11d2-883f-0016d3cca427",
        ] {
            let e = canonical_uuid("guest UUID", bad).unwrap_err().to_string();
            assert!(
                e.contains("canonical form") || e.contains("not a UUID"),
                "{bad}: {e}"
            );
        }
        assert!(
            canonical_uuid("guest UUID", "nope")
                .unwrap_err()
                .to_string()
                .contains("not a UUID")
        );
    }
}
