//! The little XML guestkeyd writes for libvirt, and the one look-up it
//! makes in libvirt's own domain XML (which disk is on an image).

use super::DiskSource;

/// The only secret definition guestkeyd makes: ephemeral (never written to
/// disk by libvirt) and private (its value cannot be read back).
pub fn secret_xml(uuid: &str, volume_path: &str) -> String {
    format!(
        "<secret ephemeral='yes' private='yes'><uuid>{uuid}</uuid><usage type='volume'><volume>{}</volume></usage></secret>",
        escape(volume_path)
    )
}

/// A `<disk>` for a block copy into the LUKS image `path` opened with
/// libvirt secret `secret`.
pub(super) fn copy_disk_xml(path: &str, driver: &str, secret: &str) -> String {
    format!(
        "<disk type='file' device='disk'><driver name='qemu' type='{driver}'/><source file='{}'><encryption format='luks'><secret type='passphrase' uuid='{secret}'/></encryption></source></disk>",
        escape(path)
    )
}

/// Text or attribute value escaped for XML.
pub(super) fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The target dev (e.g. `vda`) of the disk of libvirt's domain XML `xml`
/// whose own source is file `source.path` or volume `source.volume` of pool
/// `source.pool` (a source in `<backingStore>` or `<mirror>` is not the
/// disk's).
pub(super) fn target_of(xml: &str, source: DiskSource<'_>) -> Option<String> {
    target_where(xml, |file| file == source.path, source)
}

/// The target dev of the disk whose own source file satisfies `file`, or
/// whose source is volume `source.volume` of pool `source.pool`. Read by the
/// shared strict reader (`guestkey-domxml`).
pub(super) fn target_where(
    xml: &str,
    file: impl Fn(&str) -> bool,
    source: DiskSource<'_>,
) -> Option<String> {
    let dom = match guestkey_domxml::parse(xml) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "libvirt's domain XML was not read");
            return None;
        }
    };
    dom.disks
        .iter()
        .find(|d| match &d.source {
            guestkey_domxml::DiskSource::Volume { pool, volume } => {
                pool == source.pool && volume == source.volume
            }
            s => s.path().is_some_and(&file),
        })
        .map(|d| d.target.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_ephemeral_and_private() {
        let x = secret_xml("0f0e0d0c-0000-0000-0000-000000000001", "/p/a'b<c>&d");
        assert!(
            x.starts_with("<secret ephemeral='yes' private='yes'>"),
            "{x}"
        );
        assert!(
            x.contains("<usage type='volume'><volume>/p/a&apos;b&lt;c&gt;&amp;d</volume></usage>"),
            "{x}"
        );
    }

    #[test]
    fn the_disk_on_an_image_is_found_not_its_backing_store() {
        let xml = "<domain type='kvm'><name>t</name><uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca427</uuid><devices>
          <disk type='file'><source file='/p/base'/><target dev='vda'/></disk>
          <disk type='file'><source file='/p/top'/>
            <backingStore type='file'><source file='/p/old'/></backingStore>
            <target dev='vdb'/></disk>
          <disk type='volume'><source pool='pl' volume='v1'/><target dev='vdc'/></disk>
        </devices></domain>";
        let s = |path, pool, volume| DiskSource { path, pool, volume };
        assert_eq!(target_of(xml, s("/p/base", "", "")).as_deref(), Some("vda"));
        assert_eq!(target_of(xml, s("/p/top", "", "")).as_deref(), Some("vdb"));
        assert_eq!(target_of(xml, s("/x", "pl", "v1")).as_deref(), Some("vdc"));
        assert_eq!(target_of(xml, s("/x", "pl", "v2")), None);
        assert_eq!(
            target_of(xml, s("/p/old", "", "")),
            None,
            "a backing store is not the disk"
        );
    }
}
