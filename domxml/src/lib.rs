//! guestkey's one reader of libvirt domain XML, shared by the management
//! server (which rewrites a guest's disks to name their secrets), guestkeyd
//! (which seals a guest's keys under its name and UUID) and the libvirt
//! hook (which loads the secrets a starting guest's disks name).
//!
//! # Why it is strict
//! libvirt does not read a document the way a simple reader does. It finds
//! elements with XPath and takes the first match (`string(./name[1])`,
//! `./source[1]`), it gathers disks from every `<devices>` element, it
//! reads attributes with `xmlGetProp`, which ignores namespace prefixes,
//! and its UUID parser accepts upper case, missing or extra dashes and
//! surrounding spaces. A second reader that takes the last match, or
//! compares UUID strings, can then see another guest than libvirt: keys
//! sealed under a UUID libvirt does not have, a secret attached to a
//! source libvirt does not use. So [`parse`] refuses every document that
//! two reasonable readers could read differently, and says on which line
//! and what to change. Plain XML as libvirt writes it (`virsh dumpxml` of
//! any guest) is accepted.
//!
//! # What is refused, and why
//! - **Not XML 1.0 in UTF-8, or not well-formed**: more than 1 MiB
//!   ([`MAX_XML`]), a DOCTYPE (entity definitions), an encoding other than
//!   UTF-8 or a version other than 1.0 in the declaration, a byte order
//!   mark, characters XML forbids, unknown entities, `<` in an attribute
//!   value, text or a second element outside the root, nesting deeper than
//!   128 levels. libvirt (libxml2) refuses most of these; the others
//!   decode differently depending on who reads them.
//! - **A root other than `<domain>`.**
//! - **Two of an element libvirt reads once**: `<name>`, `<uuid>`,
//!   `<devices>` in `<domain>`; `<source>`, `<target>`, `<driver>`,
//!   `<encryption>`, `<backingStore>`, `<mirror>` in one `<disk>`;
//!   `<encryption>` in `<source>`; `<secret>` in `<encryption>`; `<source>`,
//!   `<format>`, `<backingStore>` in one backing layer. libvirt takes the
//!   first, a reader keeping the last would not. Also an `<encryption>` both
//!   in `<disk>` and in its `<source>` (libvirt refuses it), and two disks
//!   with one target.
//! - **Namespaces**: a default namespace (`xmlns='...'`) outside
//!   `<metadata>` (libvirt's XPath no longer sees the elements under it);
//!   prefixed attributes (`xmlGetProp` reads `x:type` as `type`); prefixed
//!   elements anywhere but directly in `<domain>` (`<qemu:commandline>` and
//!   the like stay accepted, their insides unread, as are `<metadata>`'s).
//! - **`<name>` and `<uuid>` that are not plain text**: child elements, CDATA,
//!   comments or processing instructions in them (libvirt reads the
//!   element's whole string value; another reader may take one text node),
//!   a name with white space at either end or a control character (libvirt
//!   keeps them, other readers trim), an empty `<uuid>` (libvirt makes one
//!   up).
//! - **A UUID not in canonical form** (`<uuid>`, `<secret uuid>`,
//!   `<sysinfo>`'s `<entry name='uuid'>`): upper case, no dashes, braces,
//!   spaces. libvirt reads all of these as the same UUID, string
//!   comparisons do not: "write it as xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx".
//!   A `<sysinfo>` UUID must be the domain's `<uuid>` (libvirt takes it as
//!   the domain's when `<uuid>` is missing).
//! - **Disks libvirt reads otherwise**: a `<disk>` anywhere but directly in
//!   `/domain/devices`; an unknown `type` or `device`; a `<source>` carrying
//!   another type's attributes (`type='file'` with `volume=` or `dev=`),
//!   empty location attributes (`file=''` means no source to libvirt);
//!   half a volume source (pool without volume); a disk without
//!   `<target dev>`; an `<encryption>` anywhere but in `<disk>` or a
//!   `<source>` (libvirt ignores it), a `<secret>` not directly in
//!   `<encryption>`, or with both or neither of uuid and usage; a
//!   type-less `<backingStore>` or `<mirror>` with contents libvirt skips.
//!
//! Sources inside `<backingStore>` and `<mirror>` are the disk's
//! [`Layer`]s, never its source.
//!
//! # Use
//! - Server: [`parse`], then [`rewrite`] with (disk index, secret UUID)
//!   pairs.
//! - guestkeyd: [`identity`] (name and UUID, UUID required).
//! - Hook: [`parse`], then [`Domain::identity`] and
//!   [`Domain::secret_uuids`] (or [`Domain::disk_secrets`] for the disk and
//!   image of each secret).
//!
//! # Fuzzing
//! `fuzzing::check` (feature `fuzzing`) states the rule: whatever
//! [`parse`] accepts, roxmltree (a second XML parser) parses too, and a
//! libvirt-like reading and a last-wins reading of its tree agree with ours
//! on the name, the UUID and every disk's source, target and secrets; and
//! [`rewrite`]'s output parses again to the same disks with the new
//! secrets. The unit tests run it over `fuzz/seeds/read/`; the fuzz target
//! runs it on whatever libFuzzer makes of them:
//! `cd domxml/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run read corpus/read seeds/read -- -dict=read.dict`.
//! A crash it finds is fixed and its input kept in the seeds as
//! `regression-*` (and as a row of the refused table).
//!
//! This crate imports only quick-xml, uuid and thiserror (and roxmltree
//! for its fuzzing checks); it knows nothing of the rest of guestkey.

#![forbid(unsafe_code)]

mod disk;
mod error;
mod model;
mod read;
mod rewrite;
mod text;
mod tree;
mod wellformed;

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
#[cfg(test)]
mod tests;

pub use error::XmlError;
pub use model::{Disk, DiskSecret, DiskSource, Domain, Encryption, Identity, Layer, SecretRef};
pub use rewrite::rewrite;

/// Largest domain XML accepted.
pub const MAX_XML: usize = 1 << 20;

/// Reads a domain's name, UUID and disks; refuses any document libvirt
/// could read differently (see the crate documentation).
pub fn parse(xml: &str) -> Result<Domain, XmlError> {
    read::domain(xml)
}

/// The name and UUID of a domain whose XML must have a `<uuid>` (what
/// guestkeyd seals a guest's keys under).
pub fn identity(xml: &str) -> Result<Identity, XmlError> {
    parse(xml)?.identity()
}
