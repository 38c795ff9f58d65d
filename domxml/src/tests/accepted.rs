//! accepted
