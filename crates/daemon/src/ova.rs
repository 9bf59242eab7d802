//! Reading an OVA: a tar holding an OVF descriptor (XML) and the disk files it names.
//!
//! Only what an import needs is read from the descriptor: the CPUs (`rasd:ResourceType` 3),
//! the memory (`ResourceType` 4, scaled by `AllocationUnits`) and the disk files
//! (`<File ovf:href=...>` in `<References>`, in order). The scanner is tolerant of namespace
//! prefixes and ignores everything else.

/// What an OVF descriptor asks for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ovf {
    /// vCPUs.
    pub cpus: Option<u32>,
    /// Memory, MiB.
    pub memory_mib: Option<u64>,
    /// Disk file names inside the OVA, in descriptor order.
    pub files: Vec<String>,
}

/// The text of every element named `local` (any namespace prefix) in `xml`.
fn elements<'a>(xml: &'a str, local: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find('<') {
        rest = &rest[i + 1..];
        let end = rest
            .find(['>', ' ', '/', '\t', '\n', '\r'])
            .unwrap_or(rest.len());
        let tag = &rest[..end];
        let name = tag.rsplit(':').next().unwrap_or(tag);
        if name != local || tag.starts_with('/') {
            continue;
        }
        let Some(open_end) = rest.find('>') else {
            break;
        };
        if rest[..open_end].ends_with('/') {
            out.push("");
            continue;
        }
        let body = &rest[open_end + 1..];
        let close = format!("</{tag}>");
        if let Some(j) = body.find(&close) {
            out.push(&body[..j]);
            rest = &body[j + close.len()..];
        }
    }
    out
}

/// The value of attribute `local` (any prefix) in each start tag named `tag_local`.
fn attributes(xml: &str, tag_local: &str, local: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find('<') {
        rest = &rest[i + 1..];
        let end = rest.find('>').unwrap_or(rest.len());
        let tag = &rest[..end];
        let name_end = tag.find([' ', '\t', '\n', '\r', '/']).unwrap_or(tag.len());
        let name = &tag[..name_end];
        if name.rsplit(':').next() != Some(tag_local) {
            continue;
        }
        for part in tag[name_end..]
            .split(['"', '\''])
            .collect::<Vec<_>>()
            .chunks(2)
        {
            if let [key, value] = part {
                let key = key.trim().trim_end_matches('=').trim();
                if key.rsplit(':').next() == Some(local) {
                    out.push(value.to_string());
                }
            }
        }
    }
    out
}

fn first_number(item: &str, local: &str) -> Option<u64> {
    elements(item, local)
        .first()
        .and_then(|t| t.trim().parse().ok())
}

/// MiB in `quantity` of `units` (`byte * 2^20`, `MegaBytes`, `GB`, ...); `None` if unknown.
fn to_mib(quantity: u64, units: &str) -> Option<u64> {
    let u = units.trim().to_ascii_lowercase().replace(' ', "");
    let bytes_per_unit: u64 = if let Some(exp) = u.strip_prefix("byte*2^") {
        1u64.checked_shl(exp.parse().ok()?)?
    } else {
        match u.as_str() {
            "" | "mb" | "megabytes" | "mib" => 1 << 20,
            "gb" | "gigabytes" | "gib" => 1 << 30,
            "kb" | "kilobytes" | "kib" => 1 << 10,
            "byte" | "bytes" => 1,
            _ => return None,
        }
    };
    Some(quantity.checked_mul(bytes_per_unit)? >> 20)
}

/// Parses an OVF descriptor.
pub fn parse(xml: &str) -> Ovf {
    let mut ovf = Ovf {
        files: attributes(xml, "File", "href"),
        ..Ovf::default()
    };
    for item in elements(xml, "Item") {
        let quantity = first_number(item, "VirtualQuantity");
        match first_number(item, "ResourceType") {
            Some(3) => ovf.cpus = quantity.and_then(|q| u32::try_from(q).ok()),
            Some(4) => {
                let units = elements(item, "AllocationUnits").first().copied();
                ovf.memory_mib = quantity.and_then(|q| to_mib(q, units.unwrap_or("")));
            }
            _ => {}
        }
    }
    ovf
}

/// Whether `name` is a plain file name (no directory part, not `.` or `..`).
pub fn plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const SAMPLE: &str = r#"<?xml version="1.0"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References>
    <File ovf:href="disk1.vmdk" ovf:id="file1"/>
    <File ovf:id="file2" ovf:href='data.vmdk' />
  </References>
  <VirtualSystem ovf:id="vm">
    <VirtualHardwareSection>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
      </Item>
      <ovf:Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>768</rasd:VirtualQuantity>
      </ovf:Item>
      <Item><rasd:ResourceType>17</rasd:ResourceType></Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>"#;

    #[test]
    fn reads_cpus_memory_and_files() {
        let o = parse(SAMPLE);
        assert_eq!(o.cpus, Some(2));
        assert_eq!(o.memory_mib, Some(768));
        assert_eq!(o.files, ["disk1.vmdk", "data.vmdk"]);
    }

    #[test]
    fn memory_units() {
        assert_eq!(to_mib(2, "byte * 2^30"), Some(2048));
        assert_eq!(to_mib(1, "GigaBytes"), Some(1024));
        assert_eq!(to_mib(512, "MB"), Some(512));
        assert_eq!(to_mib(1 << 21, "byte"), Some(2));
        assert_eq!(to_mib(1, "furlongs"), None);
        assert_eq!(to_mib(u64::MAX, "GB"), None);
    }

    #[test]
    fn garbage_gives_nothing_and_names_are_checked() {
        assert_eq!(
            parse("<<<>>> not xml <Item><rasd:ResourceType>"),
            Ovf::default()
        );
        assert!(plain_file_name("disk1.vmdk"));
        for bad in ["", "..", "../etc/passwd", "/etc/shadow", "a/b"] {
            assert!(!plain_file_name(bad), "{bad}");
        }
    }
}
