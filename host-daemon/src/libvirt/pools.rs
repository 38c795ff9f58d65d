//! Storage pools as libvirt describes them: a pool's target directory and
//! type, its volumes with the format libvirt found, and the domains whose
//! disks are on them (`guestkeyctl pool manage|show`).

use virt::connect::Connect;

use super::{DomainXml, HvError, PoolListing, PoolVolume};

fn call(what: impl std::fmt::Display) -> impl FnOnce(virt::error::Error) -> HvError {
    let what = what.to_string();
    move |e| HvError::Call {
        what,
        message: e.message().to_owned(),
    }
}

/// The text of the element at `path` (names from the root), first one,
/// its entity and character references resolved.
fn text_at(xml: &str, path: &[&str]) -> Option<String> {
    use quick_xml::events::Event;
    let mut r = quick_xml::Reader::from_str(xml);
    let mut stack: Vec<String> = vec![];
    let mut text: Option<String> = None;
    loop {
        let at = stack.iter().map(String::as_str).eq(path.iter().copied());
        match r.read_event().ok()? {
            Event::Start(e) => stack.push(e.name().0.to_owned()),
            Event::End(_) => {
                if at {
                    return text.map(|t| t.trim().to_owned());
                }
                stack.pop();
            }
            Event::Text(t) if at => text.get_or_insert_default().push_str(&t.xml10_content()),
            Event::GeneralRef(e) if at => {
                let resolved = match e.resolve_char_ref().ok()? {
                    Some(c) => c.to_string(),
                    None => match &*e.xml10_content() {
                        "amp" => "&".into(),
                        "lt" => "<".into(),
                        "gt" => ">".into(),
                        "apos" => "'".into(),
                        "quot" => "\"".into(),
                        // An entity libvirt never writes: no path.
                        _ => return None,
                    },
                };
                text.get_or_insert_default().push_str(&resolved);
            }
            Event::Eof => return None,
            _ => {}
        }
    }
}

/// The `attr` attribute of the element at `path`, first one.
fn attr_at(xml: &str, path: &[&str], attr: &str) -> Option<String> {
    use quick_xml::events::Event;
    let mut r = quick_xml::Reader::from_str(xml);
    let mut stack: Vec<String> = vec![];
    loop {
        let (e, empty) = match r.read_event().ok()? {
            Event::Start(e) => (e, false),
            Event::Empty(e) => (e, true),
            Event::End(_) => {
                stack.pop();
                continue;
            }
            Event::Eof => return None,
            _ => continue,
        };
        stack.push(e.name().0.to_owned());
        if stack.iter().map(String::as_str).eq(path.iter().copied()) {
            return e
                .attributes()
                .flatten()
                .find(|a| a.key.0 == attr)
                .map(|a| a.value.into_owned());
        }
        if empty {
            stack.pop();
        }
    }
}

/// The text of the first `<path>` element of a pool's target.
pub(super) fn pool_path(xml: &str) -> Option<String> {
    text_at(xml, &["pool", "target", "path"])
}

/// The pool's `type` attribute.
pub(super) fn pool_type(xml: &str) -> Option<String> {
    attr_at(xml, &["pool"], "type")
}

/// The format libvirt found for a volume (`<target><format type>`).
fn volume_format(xml: &str) -> Option<String> {
    attr_at(xml, &["volume", "target", "format"], "type")
}

fn no_pool(e: &virt::error::Error) -> bool {
    matches!(
        e.code(),
        virt::enumutil::Enum::Known(virt::error::ErrorNumber::NoStoragePool)
    )
}

/// The volumes of pool `pool` as libvirt sees them after a refresh (None:
/// no such pool); none are read when it holds more than `max`.
pub(super) fn list(conn: &Connect, pool: &str, max: usize) -> Result<Option<PoolListing>, HvError> {
    let p = match conn.lookup_storage_pool_by_name(pool) {
        Ok(p) => p,
        Err(e) if no_pool(&e) => return Ok(None),
        Err(e) => return Err(call(format!("storage pool {pool}"))(e)),
    };
    let xml = p
        .xml_desc(0)
        .map_err(call(format!("storage pool {pool}")))?;
    let active = p
        .is_active()
        .map_err(call(format!("storage pool {pool}")))?;
    let mut listing = PoolListing {
        kind: pool_type(&xml).unwrap_or_default(),
        path: pool_path(&xml).unwrap_or_default(),
        active,
        count: 0,
        volumes: vec![],
    };
    if !active {
        return Ok(Some(listing));
    }
    // Files made by other programs since libvirt last looked.
    if let Err(e) = p.refresh(0) {
        tracing::debug!(%pool, error = %e.message(), "pool refresh failed; using libvirt's last view");
    }
    let vols = p
        .list_all_volumes(0)
        .map_err(call(format!("volumes of storage pool {pool}")))?;
    listing.count = vols.len();
    if vols.len() > max {
        return Ok(Some(listing));
    }
    for v in vols {
        // A volume deleted between the list and these calls drops out.
        let (Ok(name), Ok(path)) = (v.name(), v.path()) else {
            continue;
        };
        let format = v
            .xml_desc(0)
            .ok()
            .and_then(|x| volume_format(&x))
            .unwrap_or_default();
        listing.volumes.push(PoolVolume { name, path, format });
    }
    listing.volumes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Some(listing))
}

/// Every domain of this libvirt: its name, whether it runs, and its
/// definitions without security information (a running one's live
/// definition and its persistent one: a disk may be in either).
pub(super) fn domains(conn: &Connect) -> Result<Vec<DomainXml>, HvError> {
    let all = conn.list_all_domains(0).map_err(call("list of domains"))?;
    let mut out = vec![];
    for d in all {
        // A domain undefined meanwhile drops out.
        let Ok(name) = d.name() else { continue };
        let running = d.is_active().unwrap_or(false);
        let mut xmls = vec![];
        if let Ok(x) = d.xml_desc(0) {
            xmls.push(x);
        }
        if running && d.is_persistent().unwrap_or(false) {
            if let Ok(x) = d.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE) {
                xmls.push(x);
            }
        }
        out.push(DomainXml {
            name,
            running,
            xmls,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_xml_is_read_by_element() {
        let xml = "<pool type='dir'><name>p</name><source><dir path='/not/this'/></source><target><path>/var/lib/p</path><permissions><mode>0711</mode></permissions></target></pool>";
        assert_eq!(pool_path(xml).as_deref(), Some("/var/lib/p"));
        assert_eq!(pool_type(xml).as_deref(), Some("dir"));
        assert_eq!(
            pool_type("<pool type=\"logical\"/>").as_deref(),
            Some("logical")
        );
    }

    #[test]
    fn a_pool_path_keeps_its_entities() {
        let xml =
            "<pool type='dir'><target><path>/srv/vm&apos;s &amp; &#x41;</path></target></pool>";
        assert_eq!(pool_path(xml).as_deref(), Some("/srv/vm's & A"));
    }

    #[test]
    fn a_volume_format_is_the_target_one() {
        let xml = "<volume type='file'><name>a</name><source/><capacity unit='bytes'>1</capacity><target><path>/p/a</path><format type='qcow2'/><permissions><mode>0600</mode></permissions></target><backingStore><format type='raw'/></backingStore></volume>";
        assert_eq!(volume_format(xml).as_deref(), Some("qcow2"));
        let xml = "<volume><backingStore><format type='raw'/></backingStore><target><path>/p/a</path></target></volume>";
        assert_eq!(volume_format(xml), None);
    }
}
