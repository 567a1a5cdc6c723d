//! The loaded objects of this process as the dynamic loader lists them (`dl_iterate_phdr`):
//! the main program first, then every shared library. Build identity reads the main program's
//! notes; code offsets are measured against its executable segments.

use std::ffi::c_void;
use std::ops::Range;

/// A program header of this target's ELF class.
#[cfg(target_pointer_width = "64")]
pub(crate) type ProgramHeader = libc::Elf64_Phdr;
/// A program header of this target's ELF class.
#[cfg(target_pointer_width = "32")]
pub(crate) type ProgramHeader = libc::Elf32_Phdr;

/// One loaded object: its load address (what its headers' `p_vaddr` are relative to), its
/// path as the loader knows it (empty for the main program) and its program headers.
pub(crate) struct Object<'a> {
    pub(crate) base: usize,
    pub(crate) name: &'a [u8],
    pub(crate) headers: &'a [ProgramHeader],
}

impl Object<'_> {
    /// The address ranges of its loaded segments that hold code (`PT_LOAD` with `PF_X`).
    pub(crate) fn code(&self) -> Vec<Range<usize>> {
        self.headers
            .iter()
            .filter(|h| h.p_type == libc::PT_LOAD && h.p_flags & libc::PF_X != 0)
            .map(|h| {
                let start = self.base.wrapping_add(h.p_vaddr as usize);
                start..start.saturating_add(h.p_memsz as usize)
            })
            .collect()
    }
}

/// Calls `visit` with each loaded object, the main program first, until it returns `false`.
///
/// `visit` runs under the loader's lock, inside a C callback: it must not panic (a panic there
/// aborts the process) nor load or unload libraries.
pub(crate) fn each_object(mut visit: impl FnMut(&Object<'_>) -> bool) {
    let mut visit: &mut dyn FnMut(&Object<'_>) -> bool = &mut visit;
    // SAFETY: `dl_iterate_phdr` calls `callback` with valid `dl_phdr_info` pointers, one per
    // loaded object, and passes `data` through untouched; `data` points to `visit`, which
    // lives on this stack frame for the whole call.
    unsafe {
        libc::dl_iterate_phdr(Some(callback), (&raw mut visit).cast::<c_void>());
    }
}

unsafe extern "C" fn callback(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut c_void,
) -> libc::c_int {
    // SAFETY: `dl_iterate_phdr` passes a valid `dl_phdr_info` for this call.
    let info = unsafe { &*info };
    // SAFETY: `data` is what `each_object` passed: a pointer to its `visit`, alive and not
    // otherwise borrowed during the call.
    let visit = unsafe { &mut *data.cast::<&mut dyn FnMut(&Object<'_>) -> bool>() };
    let headers = if info.dlpi_phdr.is_null() {
        &[][..]
    } else {
        // SAFETY: the loader gives `dlpi_phnum` program headers at `dlpi_phdr`, mapped for as
        // long as the object is loaded, which is at least this call.
        unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
    };
    let name = if info.dlpi_name.is_null() {
        &[][..]
    } else {
        // SAFETY: a non-null `dlpi_name` is a NUL-terminated string owned by the loader,
        // valid for this call.
        unsafe { std::ffi::CStr::from_ptr(info.dlpi_name) }.to_bytes()
    };
    let object = Object {
        base: info.dlpi_addr as usize,
        name,
        headers,
    };
    // Non-zero stops the iteration.
    libc::c_int::from(!visit(&object))
}

/// The ranges of the main program's executable code, and its load address.
pub(crate) fn main_program_code() -> (usize, Vec<Range<usize>>) {
    let mut found = (0, Vec::new());
    each_object(|object| {
        found = (object.base, object.code());
        false // the first object is the main program
    });
    found
}

/// The path of the loaded object whose code holds `address`, for error messages: `None` if no
/// object's code does (or it is the main program, which the loader lists without a name).
pub(crate) fn object_holding(address: usize) -> Option<String> {
    let mut found = None;
    each_object(|object| {
        if object.code().iter().any(|code| code.contains(&address)) {
            found = Some(String::from_utf8_lossy(object.name).into_owned());
            return false;
        }
        true
    });
    found.filter(|name| !name.is_empty())
}
