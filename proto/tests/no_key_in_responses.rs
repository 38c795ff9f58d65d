//! Security invariant 1: no RPC of the host daemon returns key material.
//!
//! Walks the compiled descriptors of the `HostAgent` service: every message
//! reachable from a response type may hold no `bytes` field at all, and only
//! string fields whose names are on a short list of identifiers and states.
//! Adding a field that could carry a key to a response fails this test.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::collections::{BTreeSet, HashMap};

use prost::Message;
use prost_types::field_descriptor_proto::Type;
use prost_types::{DescriptorProto, FileDescriptorSet};

/// String fields a response may have: identifiers, paths and states.
const ALLOWED_STRINGS: &[&str] = &[
    "op_id",
    "volume_id",
    "guest_uuid",
    "path",
    "state",
    "host_uuid",
];

/// String fields of one message that a response may have, each for its
/// reason: a domain's persistent definition read without libvirt's
/// security information (secrets appear in it by UUID only), and the
/// libvirt names of a disk and its storage; a storage pool's type and its
/// volumes' libvirt names and formats, why qemu-img could not read one (its
/// own words on the image's header: it never sees a key), and the names of
/// the domains using each.
const ALLOWED_MESSAGE_STRINGS: &[(&str, &str)] = &[
    (".guestkey.agent.v1.DomainDescription", "domain_xml"),
    (".guestkey.agent.v1.DiskPlace", "target"),
    (".guestkey.agent.v1.DiskPlace", "pool"),
    (".guestkey.agent.v1.DiskPlace", "volume"),
    (".guestkey.agent.v1.PoolDescription", "kind"),
    (".guestkey.agent.v1.PoolVolume", "name"),
    (".guestkey.agent.v1.PoolVolume", "format"),
    (".guestkey.agent.v1.PoolVolume", "unreadable"),
    (".guestkey.agent.v1.VolumeUser", "domain"),
    (".guestkey.agent.v1.PoolVolume", "base_of"),
    (".guestkey.agent.v1.PoolDescription", "unreadable_domains"),
    (".guestkey.agent.v1.EscrowPacketResult", "luks_uuid"),
];

/// Bytes fields a response may have, each for its reason: what a TPM
/// produced and signed (a quote and its signature) and PCR values, all of
/// fixed structure, which the server parses strictly and never treats as
/// a key. Nothing else.
const ALLOWED_BYTES: &[(&str, &str)] = &[
    (".guestkey.agent.v1.AttestResult", "quote"),
    (".guestkey.agent.v1.AttestResult", "signature"),
    (".guestkey.agent.v1.QuotedPcr", "sha256"),
    // An escrow packet: age ciphertext to custodian recipients that the
    // host's own --escrow-recipients file names (the server cannot add
    // one); no online party holds an identity that opens it.
    (".guestkey.agent.v1.EscrowPacketResult", "packet"),
];

fn messages() -> HashMap<String, DescriptorProto> {
    let set = FileDescriptorSet::decode(guestkey_proto::DESCRIPTOR_SET).unwrap();
    let mut out = HashMap::new();
    for file in set.file {
        let package = file.package().to_owned();
        for m in file.message_type {
            out.insert(format!(".{package}.{}", m.name()), m);
        }
    }
    out
}

/// Every field reachable from `type_name`: (message, field, type).
fn reachable(
    all: &HashMap<String, DescriptorProto>,
    type_name: &str,
    seen: &mut BTreeSet<String>,
    out: &mut Vec<(String, String, Type)>,
) {
    if !seen.insert(type_name.to_owned()) {
        return;
    }
    let m = all
        .get(type_name)
        .unwrap_or_else(|| panic!("unknown message {type_name}"));
    for f in &m.field {
        out.push((type_name.to_owned(), f.name().to_owned(), f.r#type()));
        if f.r#type() == Type::Message {
            reachable(all, f.type_name(), seen, out);
        }
    }
}

fn agent_response_fields() -> Vec<(String, String, Type)> {
    let set = FileDescriptorSet::decode(guestkey_proto::DESCRIPTOR_SET).unwrap();
    let all = messages();
    let service = set
        .file
        .iter()
        .flat_map(|f| &f.service)
        .find(|s| s.name() == "HostAgent")
        .expect("HostAgent service in the descriptor set");
    assert!(service.method.len() >= 9, "HostAgent lost methods");
    let mut fields = vec![];
    let mut seen = BTreeSet::new();
    for method in &service.method {
        reachable(&all, method.output_type(), &mut seen, &mut fields);
    }
    fields
}

#[test]
fn no_host_agent_response_can_carry_key_material() {
    let fields = agent_response_fields();
    assert!(!fields.is_empty());
    let bad: Vec<String> = fields
        .iter()
        .filter(|(m, name, ty)| match ty {
            Type::Bytes => !ALLOWED_BYTES.contains(&(m.as_str(), name.as_str())),
            Type::String => {
                !ALLOWED_STRINGS.contains(&name.as_str())
                    && !ALLOWED_MESSAGE_STRINGS.contains(&(m.as_str(), name.as_str()))
            }
            _ => false,
        })
        .map(|(m, name, ty)| format!("{m}.{name} ({ty:?})"))
        .collect();
    assert!(
        bad.is_empty(),
        "response fields that could carry a key: {bad:?}"
    );
}

#[test]
fn the_check_sees_request_side_key_fields() {
    // Guard against a walk that finds nothing: the sealed key, which only
    // requests carry, is a bytes field the same walk finds from a request.
    let all = messages();
    let mut fields = vec![];
    reachable(
        &all,
        ".guestkey.agent.v1.CreateVolumeRequest",
        &mut BTreeSet::new(),
        &mut fields,
    );
    assert!(
        fields
            .iter()
            .any(|(_, n, t)| n == "sealed_packet" && *t == Type::Bytes),
        "{fields:?}"
    );
}
