//! Naming a function to another process of the same build: its offset from the main
//! program's load address.
//!
//! ASLR moves the whole executable as one block, so in two processes running the same file an
//! address inside it keeps its offset from the load address. That holds only for code of the
//! executable itself: a Rust `dylib`, a library linked with `-C prefer-dynamic` or a
//! `dlopen`ed one is placed on its own. So both ends check: the driver measures an offset only
//! for an address inside the executable's code segments, and the worker turns an offset back
//! into a function only if it lands inside its own. The worker's check cannot tell a
//! function's first instruction from its middle: that is what the build check at the handshake
//! is for.

use std::ops::Range;
use std::sync::OnceLock;

use parjob_core::{Error, Initializer, InitializerEntry, InitializerWith, RemoteEntry};

use crate::RemoteError;
use crate::program::{main_program_code, object_holding};

/// Where a function is, as an offset from the main program's load address, measured in one
/// process and valid in any process running the same build.
///
/// Made by [`CodeOffset::of_entry`] and [`CodeOffset::of_initializer`] (which check the
/// function is in the executable), or read from a message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CodeOffset(pub(crate) u64);

impl CodeOffset {
    /// The offset of a batch's [`RemoteEntry`], for a worker of this build to call.
    ///
    /// `function_name` is the task function's type name
    /// (`ErasedBatch::function_name`), for the error.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the function when the entry's code is not in this
    /// program's executable (e.g. it was instantiated in a Rust `dylib` or a `dlopen`ed
    /// library), where another process could not find it.
    pub fn of_entry(entry: RemoteEntry, function_name: &str) -> Result<CodeOffset, Error> {
        let address = entry as usize;
        code()
            .offset_of(address)
            .ok_or_else(|| refused(&format!("the task function `{function_name}`"), address))
    }

    /// The offset of a worker initializer, for a worker of this build to call.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when the initializer's code is not in this program's
    /// executable.
    pub fn of_initializer(initializer: Initializer) -> Result<CodeOffset, Error> {
        let address = initializer.address();
        code()
            .offset_of(address)
            .ok_or_else(|| refused("the initializer", address))
    }

    /// The offsets of an initializer with arguments: its entry (which decodes the arguments)
    /// and the user's function, for a worker of this build to call.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when either is not in this program's executable.
    pub fn of_initializer_with(init: &InitializerWith) -> Result<(CodeOffset, CodeOffset), Error> {
        let entry = init.entry as usize;
        let entry = code()
            .offset_of(entry)
            .ok_or_else(|| refused("the initializer's entry", entry))?;
        let function = code().offset_of(init.function).ok_or_else(|| {
            refused(
                &format!("the initializer `{}`", init.type_name),
                init.function,
            )
        })?;
        Ok((entry, function))
    }

    /// The offset as a number, e.g. to log it.
    pub fn get(self) -> u64 {
        self.0
    }
}

fn refused(what: &str, address: usize) -> Error {
    let place = match object_holding(address) {
        Some(object) => format!("it is in {object}"),
        None => "no loaded object's code holds it".to_string(),
    };
    Error::InvalidConfig(format!(
        "{what} cannot run in another process: its code (address {address:#x}) is not in this \
         program's executable ({place}), and a worker finds code only by its offset in the \
         executable; build it into the program rather than a dylib or a dlopen'ed library"
    ))
}

/// Runs one frame in this worker: calls the [`RemoteEntry`] at `offset` with `frame`, `out`
/// and `on_start`, after checking that the offset leads into this program's executable code.
///
/// # Errors
/// [`RemoteError::OutsideExecutable`] (or [`RemoteError::NoExecutableCode`]) without calling
/// anything.
///
/// # Safety
/// `offset` must have been made by [`CodeOffset::of_entry`] in a process running this same
/// build (the same [`build_id()`](crate::build_id), checked at the handshake, e.g. with
/// [`Identity::check_same_build`](crate::Identity::check_same_build)), and reached this
/// process unchanged. The range check catches an offset that leaves the executable, not one
/// that lands in the middle of a function.
pub unsafe fn call_entry(
    offset: CodeOffset,
    frame: &[u8],
    out: &mut Vec<u8>,
    on_start: &mut dyn FnMut(usize),
) -> Result<(), RemoteError> {
    // SAFETY: this function's own contract: `offset` names a `RemoteEntry` of this build.
    let entry: RemoteEntry = unsafe { function_at(offset)? };
    entry(frame, out, on_start);
    Ok(())
}

/// The [`RemoteEntry`] at `offset`, after the same check as [`call_entry`], for a process
/// that relays a frame to workers of its own rather than running it (the MPI backend's worker
/// ranks hand it to `Job::relayed`, and their process pool measures the offset again).
///
/// # Errors
/// [`RemoteError::OutsideExecutable`] (or [`RemoteError::NoExecutableCode`]).
///
/// # Safety
/// As for [`call_entry`]: `offset` was made by [`CodeOffset::of_entry`] in a process running
/// this same build, checked at a handshake, and reached this process unchanged.
pub unsafe fn entry_at(offset: CodeOffset) -> Result<RemoteEntry, RemoteError> {
    // SAFETY: this function's own contract: `offset` names a `RemoteEntry` of this build.
    unsafe { function_at(offset) }
}

/// Runs the initializer at `offset` in this worker, after the same check as [`call_entry`],
/// catching a panic (its message is not printed: the driver reports it).
///
/// # Errors
/// [`RemoteError::OutsideExecutable`] (or [`RemoteError::NoExecutableCode`]) without calling
/// anything; [`RemoteError::InitializerPanicked`] with the panic's message and location.
///
/// # Safety
/// As for [`call_entry`], with an offset made by [`CodeOffset::of_initializer`].
pub unsafe fn call_initializer(offset: CodeOffset) -> Result<(), RemoteError> {
    // SAFETY: this function's own contract: `offset` names an initializer of this build.
    let initializer: fn() = unsafe { function_at(offset)? };
    parjob_core::catch_task(initializer)
        .map_err(|message| RemoteError::InitializerPanicked { message })
}

/// Runs an initializer with arguments in this worker: the entry at `entry` decodes `args`
/// and calls the function at `function` with them, after both offsets are checked as for
/// [`call_entry`]; a panic is caught.
///
/// # Errors
/// [`RemoteError::OutsideExecutable`] (or [`RemoteError::NoExecutableCode`]) or
/// [`RemoteError::Malformed`] (arguments that do not decode) without calling anything;
/// [`RemoteError::InitializerPanicked`] with the panic's message and location.
///
/// # Safety
/// As for [`call_entry`], with offsets made by [`CodeOffset::of_initializer_with`], and
/// `args` what the driver encoded for them.
pub unsafe fn call_initializer_with(
    entry: CodeOffset,
    function: CodeOffset,
    args: &[u8],
) -> Result<(), RemoteError> {
    // SAFETY: this function's own contract: `entry` names an initializer entry of this build.
    let entry: InitializerEntry = unsafe { function_at(entry)? };
    let function = code()
        .address_at(function)
        .ok_or(RemoteError::OutsideExecutable { offset: function.0 })?;
    // SAFETY: the driver measured `entry` from the entry made for the argument type of the
    // function it measured `function` from (`InitializerWith::new` makes both together), in
    // this same build, and `address_at` checked the function's address is in this
    // executable's code.
    let called = unsafe { entry(function, args) }.map_err(|reason| RemoteError::Malformed {
        message: "WELCOME",
        reason,
    })?;
    called.map_err(|message| RemoteError::InitializerPanicked { message })
}

/// The kinds of function an offset may name.
mod sealed {
    /// A function pointer type that offsets are made for.
    pub trait Callable: Copy {}
    impl Callable for parjob_core::RemoteEntry {}
    impl Callable for fn() {}
    impl Callable for parjob_core::InitializerEntry {}
}

/// The function of type `F` at `offset`, checked to be in this program's code.
///
/// # Safety
/// `offset` must have been measured (by [`CodeOffset::of_entry`] for a `RemoteEntry`, by
/// [`CodeOffset::of_initializer`] for a `fn()`) from a function of type `F` in a process
/// running this same build.
unsafe fn function_at<F: sealed::Callable>(offset: CodeOffset) -> Result<F, RemoteError> {
    const { assert!(size_of::<F>() == size_of::<usize>()) };
    let address = code()
        .address_at(offset)
        .ok_or(RemoteError::OutsideExecutable { offset: offset.0 })?;
    // SAFETY: the one place an address becomes a function. By the caller's contract, the
    // driver measured `offset` from a function of type `F` in its own copy of this build; the
    // executable is mapped as one block, so at the same offset from this process's load
    // address is the same function, of the same type. `address_at` has checked that it lies
    // in this executable's code segments (never in a library, data, or unmapped memory).
    // `F` is a function pointer (sealed), the size of a `usize` (asserted above) and never
    // null (`address` is inside a mapped segment).
    Ok(unsafe { std::mem::transmute_copy::<usize, F>(&address) })
}

/// The main program's code: its load address and executable segments, located once.
struct Code {
    base: usize,
    segments: Vec<Range<usize>>,
}

fn code() -> &'static Code {
    static CODE: OnceLock<Code> = OnceLock::new();
    CODE.get_or_init(|| {
        let (base, segments) = main_program_code();
        Code { base, segments }
    })
}

impl Code {
    fn holds(&self, address: usize) -> bool {
        self.segments
            .iter()
            .any(|segment| segment.contains(&address))
    }

    /// The offset of `address`, if it is in the executable's code.
    fn offset_of(&self, address: usize) -> Option<CodeOffset> {
        if !self.holds(address) {
            return None;
        }
        let offset = address.checked_sub(self.base)?;
        Some(CodeOffset(u64::try_from(offset).ok()?))
    }

    /// The address at `offset`, if it is in the executable's code.
    fn address_at(&self, offset: CodeOffset) -> Option<usize> {
        let address = self.base.checked_add(usize::try_from(offset.0).ok()?)?;
        self.holds(address).then_some(address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn twice(frame: &[u8], out: &mut Vec<u8>, on_start: &mut dyn FnMut(usize)) {
        for (i, &b) in frame.iter().enumerate() {
            on_start(i);
            out.push(b.wrapping_mul(2));
        }
    }

    static INITIALIZED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    fn initialize() {
        INITIALIZED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn panicking_initializer() {
        panic!("no model");
    }

    #[test]
    fn the_executable_has_code_and_a_local_function_is_in_it() {
        assert!(!code().segments.is_empty());
        let local: fn() = initialize;
        assert!(code().offset_of(local as usize).is_some());
    }

    #[test]
    fn a_function_of_a_shared_library_is_refused() {
        // libc is a shared library (a test binary links it dynamically).
        let getpid = libc::getpid as *const () as usize;
        assert_eq!(code().offset_of(getpid), None);
        let malloc = libc::malloc as *const () as usize;
        assert_eq!(code().offset_of(malloc), None);
    }

    #[test]
    fn an_entry_outside_the_executable_is_refused_naming_its_function() {
        // SAFETY: only the pointer's address is used (to measure it); it is never called.
        let foreign: RemoteEntry = unsafe {
            std::mem::transmute::<usize, RemoteEntry>(libc::getpid as *const () as usize)
        };
        let err = CodeOffset::of_entry(foreign, "my_crate::square").unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
        assert!(text.contains("`my_crate::square`"), "{text}");
        assert!(text.contains("libc"), "{text}");
    }

    #[test]
    fn an_offset_leads_back_to_its_entry_and_is_called() {
        let offset = CodeOffset::of_entry(twice, "twice").unwrap();
        let mut out = Vec::new();
        let mut started = Vec::new();
        // SAFETY: `offset` was measured from `twice` in this very process.
        unsafe { call_entry(offset, &[1, 2, 3], &mut out, &mut |i| started.push(i)) }.unwrap();
        assert_eq!(out, [2, 4, 6]);
        assert_eq!(started, [0, 1, 2]);
    }

    #[test]
    fn an_offset_outside_the_executable_code_is_refused_not_called() {
        let getpid = libc::getpid as *const () as usize;
        let outside = [
            CodeOffset(u64::MAX),
            CodeOffset(getpid.wrapping_sub(code().base) as u64),
            // Data, not code: a static of this program.
            CodeOffset((&raw const INITIALIZED as usize).wrapping_sub(code().base) as u64),
        ];
        for offset in outside {
            let mut out = Vec::new();
            // SAFETY: the offsets are outside the executable's code, so `call_entry` refuses
            // them before calling anything (which is what this test checks).
            let result = unsafe { call_entry(offset, b"x", &mut out, &mut |_| {}) };
            assert_eq!(
                result,
                Err(RemoteError::OutsideExecutable { offset: offset.0 })
            );
            assert!(out.is_empty());
        }
    }

    #[test]
    fn an_initializer_is_called_by_its_offset_and_its_panic_is_caught() {
        let offset = CodeOffset::of_initializer(Initializer(initialize)).unwrap();
        let before = INITIALIZED.load(std::sync::atomic::Ordering::SeqCst);
        // SAFETY: measured from `initialize` in this very process.
        unsafe { call_initializer(offset) }.unwrap();
        assert_eq!(
            INITIALIZED.load(std::sync::atomic::Ordering::SeqCst),
            before + 1
        );
        let offset = CodeOffset::of_initializer(Initializer(panicking_initializer)).unwrap();
        // SAFETY: measured from `panicking_initializer` in this very process.
        let err = unsafe { call_initializer(offset) }.unwrap_err();
        assert!(err.to_string().contains("no model"), "{err}");
    }
}
