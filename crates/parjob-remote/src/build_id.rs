//! The identity of this executable's build, compared at the handshake so that a worker of
//! another build is refused before it is ever sent a code offset.
//!
//! The GNU build-id note (a hash the linker writes over the whole output; Debian's and most
//! distributions' toolchains add it by default) is read from the loaded program headers, which
//! costs microseconds. Without one, the identity is a hash of the executable file itself.

use std::sync::OnceLock;

use crate::RemoteError;
use crate::header::Reader;
use crate::program::each_object;

/// The version of this crate's message layouts ([`crate::header`]). A peer whose layout or
/// backend protocol differs is refused like another build. 2: the `WELCOME` carries the
/// driver's proof of the handshake secret. 3: `RUN` and `DONE` carry the frame's tag, the
/// `RUN` its timeout and the `DONE` the task that overran it. 4: the `WELCOME` may carry an
/// initializer's arguments.
pub const LAYOUT: u32 = 4;

/// This build's identity: `gnu:` and the GNU build-id in lowercase hex, or, for an executable
/// without one, `file:`, its length and a hash of its bytes.
///
/// Computed once per process.
pub fn build_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| match gnu_build_id() {
        Some(bytes) => format!("gnu:{}", hex(&bytes)),
        None => file_fingerprint(),
    })
}

/// What a worker says about itself at the handshake: its build, the protocol it speaks, and
/// (for error messages) its executable and pid.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Identity {
    /// This crate's [`LAYOUT`] version.
    pub layout: u32,
    /// The backend's own protocol version (its messages besides this crate's).
    pub protocol: u32,
    /// [`build_id()`].
    pub build_id: String,
    /// The executable's path, or `<unknown executable>`.
    pub exe: String,
    /// The process id.
    pub pid: u32,
}

impl Identity {
    /// This process, speaking the backend's `protocol`.
    pub fn current(protocol: u32) -> Identity {
        Identity {
            layout: LAYOUT,
            protocol,
            build_id: build_id().to_string(),
            exe: std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "<unknown executable>".into()),
            pid: std::process::id(),
        }
    }

    /// Checks that the worker that sent this identity is this very build, speaking
    /// `protocol`: the condition for sending it code offsets.
    ///
    /// # Errors
    /// [`RemoteError::OtherBuild`] naming both executables and builds.
    pub fn check_same_build(&self, protocol: u32) -> Result<(), RemoteError> {
        let driver = Identity::current(protocol);
        if self.layout == driver.layout
            && self.protocol == driver.protocol
            && self.build_id == driver.build_id
        {
            return Ok(());
        }
        Err(RemoteError::OtherBuild {
            worker: Box::new(self.clone()),
            driver: Box::new(driver),
        })
    }

    /// `layout.protocol`, as error messages show it.
    pub(crate) fn protocol_text(&self) -> String {
        format!("{}.{}", self.layout, self.protocol)
    }

    /// The identity as bytes: `[layout u32][protocol u32][pid u32][build_id len u32][build_id]
    /// [exe len u32][exe]`. The versions come first so that any later layout can still be
    /// recognised as another one.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20 + self.build_id.len() + self.exe.len());
        for word in [self.layout, self.protocol, self.pid] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        for text in [&self.build_id, &self.exe] {
            let len = u32::try_from(text.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&text.as_bytes()[..len as usize]);
        }
        out
    }

    /// Reads an identity [`encode`](Identity::encode) wrote.
    ///
    /// # Errors
    /// When `bytes` is shorter than its fields say.
    pub fn decode(bytes: &[u8]) -> Result<Identity, RemoteError> {
        let mut r = Reader::fields(bytes, "identity", 20)?;
        let (layout, protocol, pid) = (r.u32(), r.u32(), r.u32());
        let text = |r: &mut Reader<'_>| -> Result<String, RemoteError> {
            r.need(4)?;
            let len = r.u32() as usize;
            Ok(String::from_utf8_lossy(r.bytes(len)?).into_owned())
        };
        let build_id = text(&mut r)?;
        let exe = text(&mut r)?;
        Ok(Identity {
            layout,
            protocol,
            build_id,
            exe,
            pid,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const NT_GNU_BUILD_ID: u32 = 3;

/// Reads the `NT_GNU_BUILD_ID` note of the main program.
fn gnu_build_id() -> Option<Vec<u8>> {
    let mut found = None;
    each_object(|program| {
        for header in program.headers.iter().filter(|h| h.p_type == libc::PT_NOTE) {
            let start = program.base.wrapping_add(header.p_vaddr as usize);
            // SAFETY: a PT_NOTE segment is loaded (it lies inside a PT_LOAD segment of the
            // same object) and is `p_memsz` bytes long at its load address; the main program
            // stays loaded for the life of the process.
            let notes =
                unsafe { std::slice::from_raw_parts(start as *const u8, header.p_memsz as usize) };
            if let Some(id) = find_build_id(notes) {
                found = Some(id.to_vec());
                break;
            }
        }
        false // the first object is the main program; the libraries' notes are not ours
    });
    found
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

    #[test]
    fn an_identity_survives_the_round_trip_and_a_short_one_is_an_error() {
        let me = Identity::current(9);
        let bytes = me.encode();
        assert_eq!(Identity::decode(&bytes), Ok(me));
        for len in 0..bytes.len() {
            assert!(
                matches!(
                    Identity::decode(&bytes[..len]),
                    Err(RemoteError::Truncated { .. })
                ),
                "{len}"
            );
        }
    }

    #[test]
    fn another_build_or_protocol_is_refused_naming_both() {
        assert_eq!(Identity::current(3).check_same_build(3), Ok(()));
        let mut other = Identity::current(3);
        other.build_id = "gnu:00".into();
        other.exe = "/tmp/other".into();
        let err = other.check_same_build(3).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("not the same build"), "{text}");
        assert!(
            text.contains("/tmp/other") && text.contains("gnu:00"),
            "{text}"
        );
        assert!(text.contains(build_id()), "{text}");
        assert!(Identity::current(3).check_same_build(4).is_err());
    }
}
