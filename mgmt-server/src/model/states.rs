//! The states of volumes, hosts and guests, and the other closed sets of
//! values the server keeps (rekey kind and placement, policy scope, volume
//! format). Each is an enum stored as its text (the same text as before
//! these types existed, so old databases read unchanged) and parsed at the
//! edge: from the admin API with [`std::str::FromStr`] (an [`InvalidInput`]
//! that lists what is allowed), from the database by the store (a row
//! holding anything else is reported as corrupt).

use std::fmt;

use crate::model::names::InvalidInput;

/// An enum whose values are a fixed set of texts.
macro_rules! text_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident as $what:literal, $hint:literal {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The text stored and shown for this value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidInput;
            fn from_str(value: &str) -> Result<Self, InvalidInput> {
                match value {
                    $( $text => Ok($name::$variant), )+
                    _ => Err(InvalidInput {
                        what: $what,
                        value: value.to_owned(),
                        why: $hint.into(),
                    }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum! {
    /// Where a volume is in its life. The pusher delivers the operation of
    /// every pending state ([`VolumeState::pending_op`]).
    pub enum VolumeState as "volume state", "not a volume state" {
        /// Key made; the host is to create the volume.
        PendingCreate = "pending-create",
        /// Key made; the host is to encrypt the existing cleartext volume
        /// (retried by the pusher after an unknown outcome).
        PendingEncrypt = "pending-encrypt",
        /// The admin's `volume encrypt` call is pushing the encryption itself.
        Encrypting = "encrypting",
        /// On its host, its key active.
        Ready = "ready",
        /// The next key generation exists; the host is to rekey to it.
        Rekeying = "rekeying",
        /// Moving with its guest to another host.
        Migrating = "migrating",
        /// The host is to turn it back into cleartext.
        PendingDecrypt = "pending-decrypt",
        /// Cleartext now; no key left (its name is free again).
        Decrypted = "decrypted",
        /// The host is to delete it; the key goes once it confirms.
        PendingDelete = "pending-delete",
        /// Gone, every key generation destroyed.
        Deleted = "deleted",
        /// A pending operation failed too often and was given up; the
        /// volume says which and why. `volume retry` queues it again.
        Failed = "failed",
    }
}

text_enum! {
    /// What the host is asked to do for a volume in a pending state.
    pub enum VolumeOp as "volume operation", "use create, encrypt, rekey, decrypt or delete" {
        /// Create it with its key.
        Create = "create",
        /// Encrypt the existing cleartext volume with its key.
        Encrypt = "encrypt",
        /// Rekey from the current generation to the next.
        Rekey = "rekey",
        /// Turn it back into cleartext.
        Decrypt = "decrypt",
        /// Delete it and the host's copy of its key.
        Delete = "delete",
    }
}

impl VolumeOp {
    /// The state in which the pusher delivers this operation.
    pub fn pending_state(self) -> VolumeState {
        match self {
            Self::Create => VolumeState::PendingCreate,
            Self::Encrypt => VolumeState::PendingEncrypt,
            Self::Rekey => VolumeState::Rekeying,
            Self::Decrypt => VolumeState::PendingDecrypt,
            Self::Delete => VolumeState::PendingDelete,
        }
    }
}

impl VolumeState {
    /// The states in which the host still works on the volume (what
    /// `volume rekey --wait` and `volume encrypt` wait for).
    pub const HOST_WORKING: [VolumeState; 6] = [
        VolumeState::PendingCreate,
        VolumeState::PendingEncrypt,
        VolumeState::Encrypting,
        VolumeState::Rekeying,
        VolumeState::PendingDecrypt,
        VolumeState::PendingDelete,
    ];

    /// Whether the host still works on the volume.
    pub fn is_pending(self) -> bool {
        Self::HOST_WORKING.contains(&self)
    }

    /// Whether the volume still holds its name (not deleted or decrypted).
    pub fn is_live(self) -> bool {
        !matches!(self, Self::Deleted | Self::Decrypted)
    }

    /// The operation the host is asked for in this state (`Encrypting` is
    /// pushed by the admin's own call, not by the pusher).
    pub fn pending_op(self) -> Option<VolumeOp> {
        match self {
            Self::PendingCreate => Some(VolumeOp::Create),
            Self::PendingEncrypt | Self::Encrypting => Some(VolumeOp::Encrypt),
            Self::Rekeying => Some(VolumeOp::Rekey),
            Self::PendingDecrypt => Some(VolumeOp::Decrypt),
            Self::PendingDelete => Some(VolumeOp::Delete),
            _ => None,
        }
    }
}

text_enum! {
    /// What a release of a volume's key to its host needs, besides the
    /// host's enrolled certificate.
    pub enum ReleasePolicy as "release policy", "use auto, attested, approved or attested+approved" {
        /// Nothing more (the host's certificate).
        Auto = "auto",
        /// A fresh, verified TPM quote of the host whose PCR values its
        /// allowlist names, for every release.
        Attested = "attested",
        /// An operator's approval of each start's request
        /// (`guestkeyctl pending approve`).
        Approved = "approved",
        /// Both: the quote, then the approval.
        AttestedApproved = "attested+approved",
    }
}

text_enum! {
    /// Whose attestation allowlist: one host's, or a host group's (every
    /// host in the group may quote its values too).
    pub enum AllowScope as "allowlist scope", "use host or group" {
        /// One host.
        Host = "host",
        /// A host group.
        Group = "group",
    }
}

text_enum! {
    /// Where a request for a start's keys is in its life.
    pub enum RequestState as "request state", "use pending, approved, denied, used or expired" {
        /// Waiting for an operator.
        Pending = "pending",
        /// Approved; its keys not released yet.
        Approved = "approved",
        /// Denied by an operator.
        Denied = "denied",
        /// Approved and its keys released (an approval is used once).
        Used = "used",
        /// Not decided (or not used) in time.
        Expired = "expired",
    }
}

text_enum! {
    /// Where a request for an escrow packet is in its life.
    pub enum EscrowState as "escrow state", "use pending, made, denied or expired" {
        /// Waiting for a second admin's approval.
        Pending = "pending",
        /// Approved, and the host made the packet: the server keeps its
        /// ciphertext.
        Made = "made",
        /// Denied by an admin.
        Denied = "denied",
        /// Not decided in time.
        Expired = "expired",
    }
}

impl ReleasePolicy {
    /// Whether a release needs the host attested.
    pub fn needs_attestation(self) -> bool {
        matches!(self, Self::Attested | Self::AttestedApproved)
    }

    /// Whether a start's release needs an operator's approval.
    pub fn needs_approval(self) -> bool {
        matches!(self, Self::Approved | Self::AttestedApproved)
    }
}

text_enum! {
    /// Where a host is in its life.
    pub enum HostState as "host state", "not a host state" {
        /// Registered with a one-time token, not enrolled yet.
        PendingEnrollment = "pending-enrollment",
        /// Enrolled: it may call the host API and receive keys.
        Enrolled = "enrolled",
        /// Revoked: its certificate no longer works, no key goes to it.
        Revoked = "revoked",
    }
}

text_enum! {
    /// A guest's state: the server's own before and after its life on the
    /// host, otherwise libvirt's domain state as the host last reported it.
    pub enum GuestState as "guest state", "not a guest state" {
        /// Recorded; the host is to define it.
        PendingDefine = "pending-define",
        /// Defined; the host reported no state.
        Defined = "defined",
        /// Undefined (its name and UUID may be used again).
        Undefined = "undefined",
        /// libvirt: running.
        Running = "running",
        /// libvirt: blocked on a resource.
        Idle = "idle",
        /// libvirt: paused.
        Paused = "paused",
        /// libvirt: being shut down.
        InShutdown = "in shutdown",
        /// libvirt: shut off.
        ShutOff = "shut off",
        /// libvirt: crashed.
        Crashed = "crashed",
        /// libvirt: suspended by guest power management.
        PmSuspended = "pmsuspended",
        /// libvirt: no state (or one this server does not know).
        NoState = "no state",
        /// Its definition failed too often and was given up: the host has
        /// nothing of it. Define it again, or undefine it.
        Failed = "failed",
    }
}

impl GuestState {
    /// A state as a host reports it: None for "" (the host said nothing);
    /// a text this server does not know is `NoState`.
    pub fn from_host(text: &str) -> Option<Self> {
        if text.is_empty() {
            return None;
        }
        Some(text.parse().unwrap_or(Self::NoState))
    }

    /// Whether the guest is gone (undefined).
    pub fn is_undefined(self) -> bool {
        self == Self::Undefined
    }

    /// Whether the host has nothing of the guest: undefined, or its
    /// definition given up. Its name and UUID may be defined again.
    pub fn is_gone(self) -> bool {
        matches!(self, Self::Undefined | Self::Failed)
    }
}

text_enum! {
    /// A guest operation waiting for its host.
    pub enum GuestOp as "guest operation", "use define, undefine, start or stop" {
        /// Define it with its keys.
        Define = "define",
        /// Undefine it; the host erases its keys.
        Undefine = "undefine",
        /// Start it.
        Start = "start",
        /// Stop (destroy) it.
        Stop = "stop",
    }
}

text_enum! {
    /// How a volume's key is replaced (also a policy's mode).
    pub enum RekeyKind as "mode", "use shallow or deep" {
        /// A new passphrase in a new keyslot; the data key stays.
        Shallow = "shallow",
        /// A new data key; all data rewritten.
        Deep = "deep",
    }
}

text_enum! {
    /// Whether a rekey is tied to its guest running.
    pub enum RekeyPlacement as "placement", "use online, offline, or nothing (online if the guest runs)" {
        /// Online if a guest runs on the volume, else offline.
        Any = "",
        /// Only while its guest runs.
        Online = "online",
        /// Only while no guest runs on it.
        Offline = "offline",
    }
}

text_enum! {
    /// What a rotation policy names.
    pub enum PolicyScope as "policy scope", "use pool or volume" {
        /// Every pool of that name, on any host.
        Pool = "pool",
        /// One volume.
        Volume = "volume",
    }
}

text_enum! {
    /// A volume's container format (LUKS inside either).
    pub enum VolumeFormat as "format", "use qcow2 or raw" {
        /// qcow2 with LUKS inside.
        Qcow2 = "qcow2",
        /// Raw LUKS.
        Raw = "raw",
    }
}

impl VolumeFormat {
    /// A format from the admin API: "" means qcow2.
    pub fn parse_or_default(value: &str) -> Result<Self, InvalidInput> {
        if value.is_empty() {
            Ok(Self::Qcow2)
        } else {
            value.parse()
        }
    }

    /// The key packet's format field.
    pub fn packet(self) -> xdr_wipe::packet::VolumeFormat {
        match self {
            Self::Qcow2 => xdr_wipe::packet::VolumeFormat::Qcow2,
            Self::Raw => xdr_wipe::packet::VolumeFormat::Raw,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_round_trip() {
        fn check<T: Copy + PartialEq + fmt::Debug + std::str::FromStr + fmt::Display>(all: &[T]) {
            for v in all {
                assert_eq!(v.to_string().parse::<T>().ok(), Some(*v), "{v:?}");
            }
        }
        check(VolumeState::ALL);
        check(VolumeOp::ALL);
        check(HostState::ALL);
        check(GuestState::ALL);
        check(GuestOp::ALL);
        check(RekeyKind::ALL);
        check(RekeyPlacement::ALL);
        check(PolicyScope::ALL);
        check(VolumeFormat::ALL);
    }

    #[test]
    fn bad_texts_name_what_is_allowed() {
        let e = "vmdk".parse::<VolumeFormat>().unwrap_err();
        assert_eq!(e.to_string(), "invalid format \"vmdk\": use qcow2 or raw");
        let e = "medium".parse::<RekeyKind>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid mode \"medium\": use shallow or deep"
        );
        assert!("sideways".parse::<RekeyPlacement>().is_err());
        assert!("Ready".parse::<VolumeState>().is_err());
        assert_eq!(
            VolumeFormat::parse_or_default("").unwrap(),
            VolumeFormat::Qcow2
        );
    }

    #[test]
    fn pending_states_are_the_ones_the_host_works_in() {
        let pending: Vec<&str> = VolumeState::ALL
            .iter()
            .filter(|s| s.is_pending())
            .map(|s| s.as_str())
            .collect();
        assert_eq!(
            pending,
            [
                "pending-create",
                "pending-encrypt",
                "encrypting",
                "rekeying",
                "pending-decrypt",
                "pending-delete"
            ]
        );
        for s in VolumeState::ALL {
            // Every state with an operation is one the host works in.
            if let Some(op) = s.pending_op() {
                assert!(s.is_pending(), "{s}");
                assert!(op.pending_state() == *s || *s == VolumeState::Encrypting);
            }
        }
        for op in VolumeOp::ALL {
            assert_eq!(op.pending_state().pending_op(), Some(*op));
        }
        assert!(!VolumeState::Deleted.is_live() && VolumeState::Migrating.is_live());
    }

    #[test]
    fn host_reported_guest_states() {
        assert_eq!(GuestState::from_host(""), None);
        assert_eq!(GuestState::from_host("shut off"), Some(GuestState::ShutOff));
        assert_eq!(GuestState::from_host("dancing"), Some(GuestState::NoState));
    }
}
