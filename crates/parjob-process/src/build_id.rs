//! The identity of this executable's build, compared at the handshake so that a worker of
//! another build is refused before it is ever sent a function offset.
//!
//! The GNU build-id note (a hash the linker writes over the whole output; Debian's and most
//! distributions' toolchains add it by default) is read from the loaded program headers, which
//! costs microseconds. Without one, the identity is a hash of the executable file itself.

use std::ffi::c_void;
use std::sync::OnceLock;

/// This build's identity as lowercase hex, prefixed by where it came from.
pub(crate) fn build_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| match gnu_build_id() {
        Some(bytes) => format!("gnu:{}", hex(&bytes)),
        None => file_fingerprint(),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const NT_GNU_BUILD_ID: u32 = 3;

/// Reads the `NT_GNU_BUILD_ID` note of the main program.
fn gnu_build_id() -> Option<Vec<u8>> {
    let mut found: Option<Vec<u8>> = None;
    // SAFETY: `dl_iterate_phdr` calls `callback` with valid `dl_phdr_info` pointers for each
    // loaded object while holding the loader lock; `data` is our `found`, alive for the call.
    unsafe {
        libc::dl_iterate_phdr(Some(callback), (&raw mut found).cast::<c_void>());
    }
    found
}

unsafe extern "C" fn callback(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut c_void,
) -> libc::c_int {
    // SAFETY: see `gnu_build_id`: both pointers are valid for this call.
    let (info, found) = unsafe { (&*info, &mut *data.cast::<Option<Vec<u8>>>()) };
    // The first object is the main program; stop after it either way.
    if info.dlpi_phdr.is_null() {
        return 1;
    }
    // SAFETY: the loader gives `dlpi_phnum` program headers at `dlpi_phdr`.
    let headers =
        unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) };
    for header in headers.iter().filter(|h| h.p_type == libc::PT_NOTE) {
        let start = (info.dlpi_addr as usize).wrapping_add(header.p_vaddr as usize);
        // SAFETY: a PT_NOTE segment is loaded (it lies inside a PT_LOAD segment of the same
        // object) and is `p_memsz` bytes long at its load address.
        let notes =
            unsafe { std::slice::from_raw_parts(start as *const u8, header.p_memsz as usize) };
        if let Some(id) = find_build_id(notes) {
            *found = Some(id.to_vec());
            break;
        }
    }
    1
}

/// Walks ELF notes (`namesz`, `descsz`, `type`, name and descriptor padded to 4 bytes).
fn find_build_id(mut notes: &[u8]) -> Option<&[u8]> {
    let word = |b: &[u8], at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    while notes.len() >= 12 {
        let namesz = word(notes, 0)? as usize;
        let descsz = word(notes, 4)? as usize;
        let kind = word(notes, 8)?;
        let name_end = 12 + namesz.next_multiple_of(4);
        let desc_end = name_end + descsz.next_multiple_of(4);
        let name = notes.get(12..12 + namesz)?;
        if kind == NT_GNU_BUILD_ID && name == b"GNU\0" {
            return notes.get(name_end..name_end + descsz);
        }
        notes = notes.get(desc_end..)?;
    }
    None
}

/// FNV-1a over the executable's bytes: slower (the file is read once per process) but
/// available for any build.
fn file_fingerprint() -> String {
    let bytes = std::env::current_exe()
        .and_then(std::fs::read)
        .unwrap_or_default();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in &bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("file:{}:{hash:016x}", bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_build_has_a_stable_identity() {
        let id = build_id();
        assert!(id.starts_with("gnu:") || id.starts_with("file:"), "{id}");
        assert_eq!(id, build_id());
    }

    #[test]
    fn notes_are_parsed() {
        let mut notes = Vec::new();
        for (name, kind, desc) in [
            (&b"Xen\0"[..], 1u32, &[9u8; 3][..]),
            (b"GNU\0", 3, &[1, 2, 3, 4, 5]),
        ] {
            notes.extend((name.len() as u32).to_ne_bytes());
            notes.extend((desc.len() as u32).to_ne_bytes());
            notes.extend(kind.to_ne_bytes());
            notes.extend(name);
            notes.extend(desc);
            notes.resize(notes.len().next_multiple_of(4), 0);
        }
        assert_eq!(find_build_id(&notes), Some(&[1u8, 2, 3, 4, 5][..]));
    }
}
