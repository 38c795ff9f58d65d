//! The server's vocabulary: validated names and inputs ([`names`]), the
//! typed states of volumes, hosts and guests ([`states`]), what the admin
//! sees ([`info`]) and the errors ([`error`]).
//!
//! May import: nothing of this crate but the leaf modules `ca` and
//! `masterkey` (for their error types). Imported by every other layer:
//! `store`, `domain`, `transport`, `scheduler` and the programs. The layers
//! above depend downwards only: model <- store <- domain <- transport,
//! scheduler <- the programs in `src/bin/`.

pub mod error;
pub mod info;
pub mod names;
pub mod states;

pub use error::{CoreError, StoreError};
pub use info::{
    AttestationOutcome, AuditRecord, Caller, EnrolledHost, EscrowEntry, GuestInfo, HostAttestation,
    HostInfo, HostTpm, ManagedPool, Overdue, Policy, Progress, RekeyOrder, ReleaseRequest,
    TpmClock, Verification, VolumeInfo,
};
pub use names::{InvalidInput, Name};
pub use states::{
    AllowScope, EscrowState, GuestOp, GuestState, HostState, PolicyScope, RekeyKind,
    RekeyPlacement, ReleasePolicy, RequestState, VolumeFormat, VolumeOp, VolumeState,
};
