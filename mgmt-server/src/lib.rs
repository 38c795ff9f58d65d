//! guestkey management server (`guestkey-server`, `guestkeyctl`): key store,
//! policy, orchestration, admin API and CLI, host enrollment CA.
//!
//! Not built yet (issue "Management server"): this crate holds no code, and no
//! binary is shipped, so nothing here claims to work.
