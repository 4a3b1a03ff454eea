//! Reads QEMU's ACPI VM generation id from user space.
//!
//! Linux (6.1) does not expose the id to user space. QEMU's SSDT holds a `VGIA` name whose value
//! is the guest-physical address of the id buffer; the 16-byte GUID sits 40 bytes into it, in the
//! little-endian (Microsoft) GUID layout. Root reads it through `/dev/mem`.

use std::path::Path;

/// Offset of the GUID inside the buffer `VGIA` points at.
const GUID_OFFSET: u64 = 40;

/// Finds the buffer address named `VGIA` in an ACPI table (AML DWord or QWord constant).
pub fn find_vgia(table: &[u8]) -> Option<u64> {
    let at = table.windows(4).position(|w| w == b"VGIA")?;
    let rest = &table[at + 4..];
    match rest.first()? {
        0x0C => {
            let bytes: [u8; 4] = rest.get(1..5)?.try_into().ok()?;
            Some(u64::from(u32::from_le_bytes(bytes)))
        }
        0x0E => {
            let bytes: [u8; 8] = rest.get(1..9)?.try_into().ok()?;
            Some(u64::from_le_bytes(bytes))
        }
        _ => None,
    }
}

/// Canonical GUID text of 16 bytes in the little-endian GUID layout.
pub fn guid_text(raw: &[u8; 16]) -> String {
    let g = raw;
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{}",
        g[3],
        g[2],
        g[1],
        g[0],
        g[5],
        g[4],
        g[7],
        g[6],
        g[8],
        g[9],
        hex::encode(&g[10..16])
    )
}

/// The machine's VM generation id, or `None` when it has no vmgenid device.
pub fn read(acpi_tables: &Path, mem: &Path) -> std::io::Result<Option<String>> {
    let Ok(entries) = std::fs::read_dir(acpi_tables) else {
        return Ok(None);
    };
    let mut address = None;
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with("SSDT") {
            continue;
        }
        let table = std::fs::read(entry.path())?;
        if let Some(found) = find_vgia(&table) {
            address = Some(found);
            break;
        }
    }
    let Some(address) = address else {
        return Ok(None);
    };
    let raw = read_physical(mem, address + GUID_OFFSET)?;
    Ok(Some(guid_text(&raw)))
}

fn read_physical(mem: &Path, address: u64) -> std::io::Result<[u8; 16]> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(mem)?;
    let page = address & !0xfff;
    let offset = (address - page) as usize;
    let length = 8192;
    // SAFETY: a fresh read-only shared mapping of /dev/mem; unmapped before returning.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            length,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            page as libc::off_t,
        )
    };
    if map == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let mut raw = [0u8; 16];
    // SAFETY: offset + 16 <= 4096 + 16 < length, inside the mapping.
    unsafe {
        std::ptr::copy_nonoverlapping((map as *const u8).add(offset), raw.as_mut_ptr(), 16);
        libc::munmap(map, length);
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_dword_and_qword_addresses() {
        let mut table = b"SSDT....junk\x08VGIA\x0c".to_vec();
        table.extend_from_slice(&0x7ffe_0000u32.to_le_bytes());
        assert_eq!(find_vgia(&table), Some(0x7ffe_0000));
        let mut table = b"xxVGIA\x0e".to_vec();
        table.extend_from_slice(&0x1_2345_6000u64.to_le_bytes());
        assert_eq!(find_vgia(&table), Some(0x1_2345_6000));
        assert_eq!(find_vgia(b"no name here"), None);
        assert_eq!(find_vgia(b"VGIA\x0c\x01"), None, "truncated constant");
    }

    #[test]
    fn guid_fields_are_byte_swapped() {
        let raw = [
            0x44, 0x33, 0x22, 0x11, 0x66, 0x55, 0x88, 0x77, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee,
            0xff, 0x00,
        ];
        assert_eq!(guid_text(&raw), "11223344-5566-7788-99aa-bbccddeeff00");
    }
}
