//! The one place that knows the codec: bincode 2's format in serde mode with fixed-width
//! little-endian integers (cheaper to encode than varints for the small numeric payloads tasks
//! carry), written and read by this module's own serde `Serializer` and `Deserializer`.
//!
//! Why not bincode's own: a `Vec<f64>` of 100 MB went through it element by element (12.5
//! million calls each way, the largest share of a big argument's cost). This module's
//! serializer and deserializer recognise vectors and slices of plain numbers (`Vec<P>`, `[P]`,
//! `&[P]`, `Box<[P]>` for `P` one of `u8..u64`, `i8..i64`, `f32`, `f64`) wherever serde hands
//! them a value of such a type (the top level, struct and tuple fields, sequence elements, map
//! keys and values, newtype structs and variants), and copy their bytes in one go. The
//! recognition is by type, not by data: serde's own impls of those types are the only ones
//! there can be (coherence), so what they would write element by element is known exactly, and
//! the bulk copy writes the same bytes. The output is byte for byte what bincode 2 writes with
//! this configuration (tests compare the two), so caches written before stay readable.
//!
//! bincode stays a dev-dependency, to check that.

use std::fmt::Display;
use std::marker::PhantomData;
use std::mem::{ManuallyDrop, size_of};

use serde::de::DeserializeOwned;
use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};
use serde::ser::{self, Serialize};

/// Appends the encoding of `value` to `out`.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), String> {
    Encoder { out, depth: 0 }.value(value).map_err(|e| e.0)
}

/// The most bytes one value's encoding may take: frames carry record lengths as `u32`.
pub const MAX_VALUE_BYTES: usize = u32::MAX as usize;

/// The deepest one value may nest (options, sequences, tuples, structs, maps, enums and
/// newtypes inside each other). Both directions recurse once per level, so without a bound a
/// forged record of a few bytes per level (`Some(Box::new(Some(..)))` a million times over)
/// overflows the decoding thread's stack, and that aborts the whole process, not just the
/// task; and a legitimately deep value encoded on a worker's big stack could abort the driver
/// decoding it on a smaller one. Encoding refuses what decoding would, so a value too deep is
/// an error of the task that returned it, named when it is written. 128, as serde_json's
/// recursion limit: 1024 overflowed a 2 MiB thread's stack in a debug build.
pub const MAX_DEPTH: usize = 128;

/// The most elements or map entries taking no bytes (`()`, unit structs, empty tuples) one
/// value may hold, all its sequences and maps together. Every other element takes at least a
/// byte, so the input bounds how many there are; these alone it does not: an 8-byte record
/// claiming a `Vec<()>` of 2^64 elements would keep the decoder busy for centuries.
pub const MAX_EMPTY_PARTS: usize = 1 << 20;

/// Decodes one value from the front of `bytes`, returning it and the bytes it used.
///
/// Bytes may come from another process, so every length the input claims is checked against
/// what is left of it before anything is allocated: a `String` of 2^46 bytes in a 13-byte
/// record, or a `Vec<f64>` of 2^40 elements, is an error, never an abort. Sequences of other
/// types are given a size hint no larger than the bytes left, so what serde preallocates for
/// them is bounded by the input too (and by 1 MiB, serde's own cap).
pub fn decode_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), String> {
    if bytes.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "{} bytes is more than one value may take (4 GiB)",
            bytes.len()
        ));
    }
    let mut decoder = Decoder {
        input: bytes,
        at: 0,
        depth: 0,
        empty: 0,
    };
    let value = decoder.seed(PhantomData::<T>).map_err(|e| e.0)?;
    Ok((value, decoder.at))
}

/// What went wrong, as the message the callers pass on.
#[derive(Debug)]
struct CodecError(String);

impl Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CodecError {}

impl ser::Error for CodecError {
    fn custom<M: Display>(message: M) -> Self {
        CodecError(message.to_string())
    }
}

impl de::Error for CodecError {
    fn custom<M: Display>(message: M) -> Self {
        CodecError(message.to_string())
    }
}

type Result<T, E = CodecError> = std::result::Result<T, E>;

/// Whether this machine's numbers are laid out as the format's (little-endian): only then may
/// their bytes be copied as they are.
const NATIVE_IS_WIRE: bool = cfg!(target_endian = "little");

/// The bytes of `value` if it is a vector or slice of plain numbers, and how many elements.
fn pod_bytes<T: ?Sized>(value: &T) -> Option<(usize, &[u8])> {
    macro_rules! each {
        ($($p:ty),*) => {$(
            if unty::type_equal::<T, Vec<$p>>() {
                // SAFETY: `T` is `Vec<$p>` (type_equal compares type ids, lifetimes erased, and
                // this type has none), so `&T` is a `&Vec<$p>`, same size and meaning.
                let v: &Vec<$p> = unsafe { std::mem::transmute_copy::<&T, &Vec<$p>>(&value) };
                return Some((v.len(), bytemuck::cast_slice(v.as_slice())));
            }
            if unty::type_equal::<T, [$p]>() {
                // SAFETY: `T` is `[$p]`, so `&T` is a `&[$p]` (both fat pointers of one layout).
                let v: &[$p] = unsafe { std::mem::transmute_copy::<&T, &[$p]>(&value) };
                return Some((v.len(), bytemuck::cast_slice(v)));
            }
            if unty::type_equal::<T, Box<[$p]>>() {
                // SAFETY: `T` is `Box<[$p]>`, so `&T` is a `&Box<[$p]>`.
                let v: &Box<[$p]> = unsafe { std::mem::transmute_copy::<&T, &Box<[$p]>>(&value) };
                return Some((v.len(), bytemuck::cast_slice(&v[..])));
            }
            if unty::type_equal::<T, &[$p]>() {
                // SAFETY: `T` is `&'a [$p]` for some `'a` (type ids erase lifetimes); the slice
                // is only read while `value` is borrowed, so within `'a`.
                let v: &&[$p] = unsafe { std::mem::transmute_copy::<&T, &&[$p]>(&value) };
                return Some((v.len(), bytemuck::cast_slice(*v)));
            }
        )*};
    }
    if NATIVE_IS_WIRE {
        each!(f64, f32, u64, i64, u32, i32, u16, i16, u8, i8);
    }
    None
}

/// The serializer: bincode 2's layout (fixed-width little-endian integers, `u64` lengths,
/// `u32` variant indices), appended to `out`.
struct Encoder<'a> {
    out: &'a mut Vec<u8>,
    /// How many compound values the one being written is inside.
    depth: usize,
}

/// The error for a value nested deeper than [`MAX_DEPTH`].
fn too_deep() -> CodecError {
    CodecError(format!(
        "the value nests more than {MAX_DEPTH} levels deep (options, sequences, structs, \
         enums inside each other)"
    ))
}

impl Encoder<'_> {
    /// Encodes one value, copying vectors of plain numbers whole.
    #[inline]
    fn value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        if let Some((len, bytes)) = pod_bytes(value) {
            self.len(len);
            if self.out.capacity() - self.out.len() < bytes.len() {
                // A new buffer, or a bigger one: fresh memory, on huge pages if it may.
                self.out.reserve(bytes.len());
                let spare = self.out.spare_capacity_mut();
                prefer_huge_pages(spare.as_mut_ptr().cast::<u8>(), spare.len());
            }
            self.out.extend_from_slice(bytes);
            return Ok(());
        }
        value.serialize(self)
    }

    #[inline]
    fn len(&mut self, len: usize) {
        self.out.extend_from_slice(&(len as u64).to_le_bytes());
    }

    #[inline]
    fn variant(&mut self, index: u32) {
        self.out.extend_from_slice(&index.to_le_bytes());
    }

    /// Enters one more level of nesting (left by [`Encoder::leave`]), refusing past
    /// [`MAX_DEPTH`].
    #[inline]
    fn enter(&mut self) -> Result<()> {
        if self.depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        self.depth += 1;
        Ok(())
    }

    #[inline]
    fn leave(&mut self) {
        self.depth -= 1;
    }

    /// Writes `value` one level deeper.
    #[inline]
    fn nested<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        self.enter()?;
        self.value(value)?;
        self.leave();
        Ok(())
    }
}

macro_rules! encode_numbers {
    ($($method:ident: $t:ty),*) => {$(
        #[inline]
        fn $method(self, v: $t) -> Result<()> {
            self.out.extend_from_slice(&v.to_le_bytes());
            Ok(())
        }
    )*};
}

impl<'b> ser::Serializer for &mut Encoder<'b> {
    type Ok = ();
    type Error = CodecError;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    encode_numbers!(
        serialize_i8: i8, serialize_i16: i16, serialize_i32: i32, serialize_i64: i64,
        serialize_i128: i128, serialize_u16: u16, serialize_u32: u32, serialize_u64: u64,
        serialize_u128: u128, serialize_f32: f32, serialize_f64: f64
    );

    #[inline]
    fn serialize_u8(self, v: u8) -> Result<()> {
        self.out.push(v);
        Ok(())
    }
    fn serialize_bool(self, v: bool) -> Result<()> {
        self.out.push(u8::from(v));
        Ok(())
    }
    fn serialize_char(self, v: char) -> Result<()> {
        self.out
            .extend_from_slice(v.encode_utf8(&mut [0; 4]).as_bytes());
        Ok(())
    }
    fn serialize_str(self, v: &str) -> Result<()> {
        self.serialize_bytes(v.as_bytes())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<()> {
        self.len(v.len());
        self.out.extend_from_slice(v);
        Ok(())
    }
    fn serialize_none(self) -> Result<()> {
        self.out.push(0);
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<()> {
        self.out.push(1);
        self.nested(value)
    }
    fn serialize_unit(self) -> Result<()> {
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<()> {
        Ok(())
    }
    fn serialize_unit_variant(self, _: &'static str, index: u32, _: &'static str) -> Result<()> {
        // The decoder reads every enum a level deeper, its unit variants too.
        self.enter()?;
        self.leave();
        self.variant(index);
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<()> {
        self.nested(value)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        index: u32,
        _: &'static str,
        value: &T,
    ) -> Result<()> {
        self.variant(index);
        self.nested(value)
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<Self> {
        let len = len.ok_or_else(|| {
            CodecError(
                "a sequence must have a known length (a `Serialize` impl that streams an \
                 iterator of unknown length cannot be encoded)"
                    .into(),
            )
        })?;
        self.enter()?;
        self.len(len);
        Ok(self)
    }
    fn serialize_tuple(self, _: usize) -> Result<Self> {
        self.enter()?;
        Ok(self)
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self> {
        self.enter()?;
        Ok(self)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        index: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self> {
        self.enter()?;
        self.variant(index);
        Ok(self)
    }
    fn serialize_map(self, len: Option<usize>) -> Result<Self> {
        let len = len.ok_or_else(|| {
            CodecError(
                "a map must have a known length: `#[serde(flatten)]` fields, and maps streamed \
                 from an iterator of unknown length, cannot be encoded in parjob's positional \
                 format"
                    .into(),
            )
        })?;
        self.enter()?;
        self.len(len);
        Ok(self)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self> {
        self.enter()?;
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        index: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self> {
        self.enter()?;
        self.variant(index);
        Ok(self)
    }
    fn is_human_readable(&self) -> bool {
        false
    }
}

/// The compound serializers: every part is a value, encoded in turn; `end` leaves the level
/// their start entered.
macro_rules! encode_compound {
    ($($trait:ident :: $method:ident $(($key:ty))?),*) => {$(
        impl<'b> ser::$trait for &mut Encoder<'b> {
            type Ok = ();
            type Error = CodecError;
            #[inline]
            fn $method<T: Serialize + ?Sized>(&mut self, $(_: $key,)? value: &T) -> Result<()> {
                self.value(value)
            }
            fn end(self) -> Result<()> {
                self.leave();
                Ok(())
            }
        }
    )*};
}

encode_compound!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

/// Struct fields: each a value, in declaration order, and never one left out. The format has
/// no field names, so a field a `#[serde(skip_serializing_if = ..)]` leaves out (serde calls
/// `skip_field` for it) would make the decoder read the next field's bytes as this one's: a
/// wrong value with no error, or a confusing one. It is an error here, naming the field.
macro_rules! encode_struct {
    ($($trait:ident),*) => {$(
        impl<'b> ser::$trait for &mut Encoder<'b> {
            type Ok = ();
            type Error = CodecError;
            #[inline]
            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                _: &'static str,
                value: &T,
            ) -> Result<()> {
                self.value(value)
            }
            fn skip_field(&mut self, key: &'static str) -> Result<()> {
                Err(skipped_field(key))
            }
            fn end(self) -> Result<()> {
                self.leave();
                Ok(())
            }
        }
    )*};
}

encode_struct!(SerializeStruct, SerializeStructVariant);

/// The error for a struct field left out by `#[serde(skip_serializing_if = ..)]`.
fn skipped_field(key: &str) -> CodecError {
    CodecError(format!(
        "field `{key}` was left out by `#[serde(skip_serializing_if = ..)]`: parjob's format \
         stores fields by position, not by name, so a field left out would shift every field \
         after it; remove `skip_serializing_if` from types that go to another process or into \
         a Memory"
    ))
}

/// What types that need a self-describing format say when they meet this one.
const NOT_SELF_DESCRIBING: &str = "parjob's format is not self-describing (bincode's layout: \
     no field names or type tags), so it cannot decode `#[serde(untagged)]` or internally \
     tagged (`#[serde(tag = ..)]`) enums, `#[serde(flatten)]` fields, or values such as \
     `serde_json::Value`; use plain structs and enums in types that go to another process or \
     into a Memory";

impl<'b> ser::SerializeMap for &mut Encoder<'b> {
    type Ok = ();
    type Error = CodecError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<()> {
        self.value(key)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        self.value(value)
    }
    fn end(self) -> Result<()> {
        self.leave();
        Ok(())
    }
}

/// The deserializer: reads what [`Encoder`] writes from `input`, `at` bytes in.
struct Decoder<'de> {
    input: &'de [u8],
    at: usize,
    /// How many compound values the one being read is inside.
    depth: usize,
    /// How many elements and entries so far took no bytes: see [`MAX_EMPTY_PARTS`].
    empty: usize,
}

impl<'de> Decoder<'de> {
    /// The next `n` bytes, or an error if the input holds fewer.
    #[inline]
    fn take(&mut self, n: usize) -> Result<&'de [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.input.len());
        match end {
            Some(end) => {
                let bytes = &self.input[self.at..end];
                self.at = end;
                Ok(bytes)
            }
            None => Err(self.truncated(n)),
        }
    }

    fn truncated(&self, n: usize) -> CodecError {
        CodecError(format!(
            "unexpected end of input: {n} more bytes needed at byte {} of {}",
            self.at,
            self.input.len()
        ))
    }

    #[inline]
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let bytes = self.take(N)?;
        let mut array = [0; N];
        array.copy_from_slice(bytes);
        Ok(array)
    }

    fn left(&self) -> usize {
        self.input.len() - self.at
    }

    /// A length the input claims (a `u64`).
    fn len(&mut self) -> Result<usize> {
        let len = u64::from_le_bytes(self.array()?);
        usize::try_from(len).map_err(|_| self.claims_too_much())
    }

    fn claims_too_much(&self) -> CodecError {
        CodecError(format!(
            "a length inside the value claims more than its {} bytes could hold (corrupt or \
             forged input)",
            self.input.len()
        ))
    }

    /// A length of `size`-byte items followed by them: the length, checked against the input
    /// left, and the items' bytes.
    fn sized(&mut self, size: usize) -> Result<(usize, &'de [u8])> {
        let len = self.len()?;
        let bytes = len
            .checked_mul(size)
            .filter(|&n| n <= self.left())
            .ok_or_else(|| self.claims_too_much())?;
        Ok((len, self.take(bytes)?))
    }

    /// Runs `read` one level of nesting deeper, refusing past [`MAX_DEPTH`].
    #[inline]
    fn nested<R>(&mut self, read: impl FnOnce(&mut Self) -> Result<R>) -> Result<R> {
        if self.depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        self.depth += 1;
        let value = read(self)?;
        self.depth -= 1;
        Ok(value)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn tag(&mut self, what: &str) -> Result<bool> {
        match self.array::<1>()? {
            [0] => Ok(false),
            [1] => Ok(true),
            [other] => Err(CodecError(format!(
                "invalid {what}: expected 0 or 1, found {other}"
            ))),
        }
    }

    /// Decodes one value through `seed`, copying vectors of plain numbers whole.
    #[inline]
    fn seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value> {
        macro_rules! each {
            ($($p:ty),*) => {$(
                if unty::type_equal::<S, PhantomData<Vec<$p>>>()
                    && size_of::<S::Value>() == size_of::<Vec<$p>>()
                {
                    let (len, bytes) = self.sized(size_of::<$p>())?;
                    let values = ManuallyDrop::new(copied::<$p>(len, bytes));
                    // SAFETY: `S` is `PhantomData<Vec<$p>>`, whose `DeserializeSeed` impl
                    // (serde's, the only one there can be) has `Value = Vec<$p>`: the vector
                    // is moved out as the value it is (and not dropped here).
                    return Ok(unsafe { std::mem::transmute_copy::<Vec<$p>, S::Value>(&values) });
                }
                if unty::type_equal::<S, PhantomData<Box<[$p]>>>()
                    && size_of::<S::Value>() == size_of::<Box<[$p]>>()
                {
                    let (len, bytes) = self.sized(size_of::<$p>())?;
                    let values = ManuallyDrop::new(copied::<$p>(len, bytes).into_boxed_slice());
                    // SAFETY: as above, with `Value = Box<[$p]>`.
                    return Ok(unsafe {
                        std::mem::transmute_copy::<Box<[$p]>, S::Value>(&values)
                    });
                }
            )*};
        }
        if NATIVE_IS_WIRE {
            each!(f64, f32, u64, i64, u32, i32, u16, i16, u8, i8);
        }
        seed.deserialize(self)
    }
}

/// A vector of the `len` numbers whose bytes (as the format writes them) are `bytes`: one copy
/// into memory that was never written, instead of zeroing it first and copying over the zeros
/// (for 100 MB, a pass over memory saved), on huge pages where the kernel allows (see
/// [`prefer_huge_pages`]).
///
/// `bytes` must be exactly `len` numbers long, as [`Decoder::sized`] returns them; anything
/// else is a bug in this module, and panics rather than reading past either buffer.
#[inline]
fn copied<P: bytemuck::Pod>(len: usize, bytes: &[u8]) -> Vec<P> {
    assert_eq!(Some(bytes.len()), len.checked_mul(size_of::<P>()));
    let mut values: Vec<P> = Vec::with_capacity(len);
    prefer_huge_pages(values.as_mut_ptr().cast::<u8>(), bytes.len());
    // SAFETY: the vector's buffer holds at least `len` elements, `len * size_of::<P>()` bytes,
    // exactly `bytes.len()` (checked above); it is a new allocation, so it does not overlap
    // `bytes`; any bytes are a valid `P` (`Pod`: plain numbers here, no padding), so after the
    // copy the first `len` elements are initialised and `set_len` may expose them.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            values.as_mut_ptr().cast::<u8>(),
            bytes.len(),
        );
        values.set_len(len);
    }
    values
}

/// Allocations of at least this many bytes are offered huge pages (see [`prefer_huge_pages`]).
const HUGE_PAGES_FROM: usize = 8 << 20;

/// Whether the codec asks for transparent huge pages on its big buffers: only when
/// `PARJOB_HUGE_PAGES=1` (read once per process; worker processes inherit it). Off by default:
/// what huge pages cost depends on the machine far more than small pages do. On one VM the
/// benchmarks ran on they faulted 100 MB in 45-50 ms against 100-200 ms on small pages; on
/// another (a VM whose freed memory goes back to its host, virtio-balloon free page reporting)
/// a huge page allocated a few seconds after memory was freed took 4-5x longer than small
/// pages, and the first 100 MB argument to a new process pool took 2-4.7 s instead of
/// 0.13-0.33 s. With `transparent_hugepage/defrag` at `madvise`, an advised fault may also
/// stall in compaction on a fragmented machine.
fn huge_pages_wanted() -> bool {
    static WANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WANTED.get_or_init(|| std::env::var_os("PARJOB_HUGE_PAGES").is_some_and(|v| v == "1"))
}

/// Asks the kernel to back the untouched allocation `[start, start + len)` with transparent
/// huge pages (2 MiB) where it can, before anything writes it. A new big allocation is fresh
/// memory, and each of its 4 KiB pages costs a page fault when first written (1 to 2.5 µs each
/// on the virtual machines the benchmarks ran on: 100 MB of `f64` took longer to fault in than
/// to copy); a huge page costs one fault per 2 MiB, and freeing it is cheaper too. Only the
/// whole 2 MiB blocks inside the allocation are advised, so no memory outside it is touched.
/// With the kernel's THP setting at `never` (or on other systems) nothing changes. A hint:
/// its result is ignored. Only when [`huge_pages_wanted`].
#[inline]
fn prefer_huge_pages(start: *mut u8, len: usize) {
    #[cfg(all(target_os = "linux", not(miri)))]
    if len >= HUGE_PAGES_FROM && huge_pages_wanted() {
        const HUGE: usize = 2 << 20;
        let first = (start as usize).next_multiple_of(HUGE);
        let end = (start as usize + len) & !(HUGE - 1);
        if end > first {
            // SAFETY: `[first, end)` lies inside an allocation the caller owns and has not
            // handed to anyone; MADV_HUGEPAGE only sets the kernel's policy for faults in that
            // range: it reads and writes no memory, and keeps every byte's value.
            unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(all(target_os = "linux", not(miri))))]
    let _ = (start, len);
}

macro_rules! decode_numbers {
    ($($method:ident: $t:ty => $visit:ident),*) => {$(
        #[inline]
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
            visitor.$visit(<$t>::from_le_bytes(self.array()?))
        }
    )*};
}

impl<'de> de::Deserializer<'de> for &mut Decoder<'de> {
    type Error = CodecError;

    decode_numbers!(
        deserialize_u8: u8 => visit_u8, deserialize_u16: u16 => visit_u16,
        deserialize_u32: u32 => visit_u32, deserialize_u64: u64 => visit_u64,
        deserialize_u128: u128 => visit_u128, deserialize_i8: i8 => visit_i8,
        deserialize_i16: i16 => visit_i16, deserialize_i32: i32 => visit_i32,
        deserialize_i64: i64 => visit_i64, deserialize_i128: i128 => visit_i128,
        deserialize_f32: f32 => visit_f32, deserialize_f64: f64 => visit_f64
    );

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value> {
        Err(CodecError(format!(
            "deserialize_any is not supported: {NOT_SELF_DESCRIBING}"
        )))
    }
    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_bool(self.tag("bool")?)
    }
    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        let [first] = self.array::<1>()?;
        let width = match first {
            0x00..=0x7f => 1,
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => 0,
        };
        self.at -= 1;
        let bytes = if width == 0 {
            &[first][..]
        } else {
            self.take(width)?
        };
        let c = std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| s.chars().next())
            .ok_or_else(|| CodecError(format!("invalid char encoding {bytes:?}")))?;
        visitor.visit_char(c)
    }
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_string(visitor)
    }
    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        let (_, bytes) = self.sized(1)?;
        let s = std::str::from_utf8(bytes)
            .map_err(|e| CodecError(format!("a string is not UTF-8: {e}")))?;
        visitor.visit_string(s.to_owned())
    }
    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        self.deserialize_byte_buf(visitor)
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        let (_, bytes) = self.sized(1)?;
        visitor.visit_byte_buf(bytes.to_vec())
    }
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        if self.tag("Option<T> tag")? {
            self.nested(|de| visitor.visit_some(de))
        } else {
            visitor.visit_none()
        }
    }
    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        visitor.visit_unit()
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value> {
        visitor.visit_unit()
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value> {
        self.nested(|de| visitor.visit_newtype_struct(de))
    }
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        let len = self.len()?;
        self.deserialize_tuple(len, visitor)
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value> {
        self.nested(|de| {
            visitor.visit_seq(Parts {
                de,
                len,
                entry_at: 0,
            })
        })
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value> {
        self.deserialize_tuple(len, visitor)
    }
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value> {
        let len = self.len()?;
        self.nested(|de| {
            visitor.visit_map(Parts {
                de,
                len,
                entry_at: 0,
            })
        })
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        self.deserialize_tuple(fields.len(), visitor)
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        self.nested(|de| visitor.visit_enum(de))
    }
    fn deserialize_identifier<V: Visitor<'de>>(self, _: V) -> Result<V::Value> {
        Err(CodecError(
            "the format has no identifiers: deserialize_identifier is not supported".into(),
        ))
    }
    fn deserialize_ignored_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value> {
        Err(CodecError(format!(
            "deserialize_ignored_any is not supported: {NOT_SELF_DESCRIBING}"
        )))
    }
    fn is_human_readable(&self) -> bool {
        false
    }
}

/// The elements of a sequence, tuple or struct, or the entries of a map: `len` more values.
struct Parts<'a, 'de> {
    de: &'a mut Decoder<'de>,
    len: usize,
    /// Where the map entry being read began.
    entry_at: usize,
}

impl<'de> Parts<'_, 'de> {
    /// No more than the bytes left, so that what serde preallocates is bounded by the input.
    fn hint(&self) -> Option<usize> {
        Some(self.len.min(self.de.left()))
    }

    /// Reads one element (or key, or value) through `seed`; `from` is where its part began:
    /// a part that took no bytes counts against [`MAX_EMPTY_PARTS`].
    #[inline]
    fn part<S: DeserializeSeed<'de>>(&mut self, seed: S, from: usize) -> Result<S::Value> {
        let value = self.de.seed(seed)?;
        if self.de.at == from {
            self.de.empty += 1;
            if self.de.empty > MAX_EMPTY_PARTS {
                return Err(CodecError(format!(
                    "the value holds more than {MAX_EMPTY_PARTS} elements taking no bytes \
                     (corrupt or forged input, or a too long sequence of `()`)"
                )));
            }
        }
        Ok(value)
    }
}

impl<'de> de::SeqAccess<'de> for Parts<'_, 'de> {
    type Error = CodecError;
    #[inline]
    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>> {
        if self.len == 0 {
            return Ok(None);
        }
        self.len -= 1;
        let from = self.de.at;
        self.part(seed, from).map(Some)
    }
    fn size_hint(&self) -> Option<usize> {
        self.hint()
    }
}

impl<'de> de::MapAccess<'de> for Parts<'_, 'de> {
    type Error = CodecError;
    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>> {
        if self.len == 0 {
            return Ok(None);
        }
        self.len -= 1;
        // The key is read as is; whether the entry took bytes is known after its value.
        self.entry_at = self.de.at;
        self.de.seed(seed).map(Some)
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value> {
        let from = self.entry_at;
        self.part(seed, from)
    }
    fn size_hint(&self) -> Option<usize> {
        self.hint()
    }
}

impl<'de> de::EnumAccess<'de> for &mut Decoder<'de> {
    type Error = CodecError;
    type Variant = Self;
    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self)> {
        let index = self.u32()?;
        let value = seed.deserialize(index.into_deserializer())?;
        Ok((value, self))
    }
}

impl<'de> de::VariantAccess<'de> for &mut Decoder<'de> {
    type Error = CodecError;
    fn unit_variant(self) -> Result<()> {
        Ok(())
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value> {
        self.seed(seed)
    }
    // The fields are read at the enum's level (entered by `deserialize_enum`), as the
    // encoder writes them at its variant's.
    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value> {
        visitor.visit_seq(Parts {
            de: self,
            len,
            entry_at: 0,
        })
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value> {
        visitor.visit_seq(Parts {
            de: self,
            len: fields.len(),
            entry_at: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_back_to_back() {
        let mut bytes = Vec::new();
        encode_into(&(7u64, "seven".to_string()), &mut bytes).unwrap();
        encode_into(&vec![1.5f64, 2.5], &mut bytes).unwrap();
        let ((n, s), used): ((u64, String), usize) = decode_prefix(&bytes).unwrap();
        assert_eq!((n, s.as_str()), (7, "seven"));
        let (v, rest): (Vec<f64>, usize) = decode_prefix(&bytes[used..]).unwrap();
        assert_eq!(v, [1.5, 2.5]);
        assert_eq!(used + rest, bytes.len());
    }

    #[test]
    fn a_length_claiming_more_than_the_input_holds_is_an_error_not_an_abort() {
        for claimed in [1u64 << 46, 1 << 63, u64::MAX] {
            let mut record = claimed.to_le_bytes().to_vec();
            record.extend_from_slice(b"hello");
            let err = decode_prefix::<String>(&record).unwrap_err();
            assert!(err.contains("claims more than its 13 bytes"), "{err}");
            assert!(decode_prefix::<Vec<u8>>(&record).is_err());
            assert!(decode_prefix::<(u8, serde_bytes::ByteBuf)>(&record).is_err());
        }
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "megabyte strings: minutes under Miri (the bulk paths' `unsafe` is covered by the smaller tests)"
    )]
    fn values_near_a_budget_step_still_decode() {
        for len in [(1 << 16) - 8, (1 << 16) + 1, (1 << 20) + 3] {
            let value = "x".repeat(len);
            let mut bytes = Vec::new();
            encode_into(&value, &mut bytes).unwrap();
            let (back, used): (String, usize) = decode_prefix(&bytes).unwrap();
            assert_eq!((back.len(), used), (len, bytes.len()));
        }
        let strings: Vec<String> = (0..5000).map(|i| i.to_string()).collect();
        let mut bytes = Vec::new();
        encode_into(&strings, &mut bytes).unwrap();
        assert_eq!(decode_prefix::<Vec<String>>(&bytes).unwrap().0, strings);
    }

    /// The type a new user wrote: with its label left out, bincode's layout decoded it as
    /// another value without an error (`a` took `b`'s byte, `b` the length of `tail`).
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Job {
        #[serde(skip_serializing_if = "Option::is_none")]
        label: Option<u8>,
        a: u8,
        b: u8,
        tail: Vec<u8>,
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    enum Mark {
        Dot,
        Line { from: u8, to: u8 },
    }

    #[test]
    fn a_field_left_out_by_skip_serializing_if_is_an_error_naming_it_not_a_shifted_value() {
        let labelled = Job {
            label: Some(3),
            a: 0,
            b: 5,
            tail: vec![0],
        };
        let mut bytes = Vec::new();
        encode_into(&labelled, &mut bytes).unwrap();
        assert_eq!(decode_prefix::<Job>(&bytes).unwrap().0, labelled);
        let unlabelled = Job {
            label: None,
            ..labelled
        };
        let err = encode_into(&unlabelled, &mut Vec::new()).unwrap_err();
        assert!(err.contains("field `label`"), "{err}");
        assert!(err.contains("skip_serializing_if"), "{err}");
        // Inside a struct variant, a tuple and a vector alike.
        #[derive(serde::Serialize)]
        enum Wrapper {
            Holds {
                #[serde(skip_serializing_if = "Vec::is_empty")]
                items: Vec<u8>,
            },
        }
        let err = encode_into(
            &(1u8, vec![Wrapper::Holds { items: vec![] }]),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(err.contains("field `items`"), "{err}");
        // Plain structs and enums are untouched.
        let marks = vec![Mark::Dot, Mark::Line { from: 1, to: 2 }];
        let mut bytes = Vec::new();
        encode_into(&marks, &mut bytes).unwrap();
        assert_eq!(decode_prefix::<Vec<Mark>>(&bytes).unwrap().0, marks);
    }

    #[test]
    fn types_that_need_a_self_describing_format_say_which_attribute_is_the_cause() {
        #[derive(Debug, serde::Serialize, serde::Deserialize)]
        #[serde(untagged)]
        enum Loose {
            Number(u64),
            Text(String),
        }
        let mut bytes = Vec::new();
        encode_into(&Loose::Number(7), &mut bytes).unwrap();
        let err = decode_prefix::<Loose>(&bytes).unwrap_err();
        assert!(err.contains("#[serde(untagged)]"), "{err}");

        #[derive(Debug, serde::Serialize, serde::Deserialize)]
        struct Inner {
            x: u8,
        }
        #[derive(Debug, serde::Serialize, serde::Deserialize)]
        struct Outer {
            #[serde(flatten)]
            inner: Inner,
        }
        let err = encode_into(
            &Outer {
                inner: Inner { x: 1 },
            },
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(err.contains("#[serde(flatten)]"), "{err}");
    }

    /// A list that nests one `Option` per element, as a recursive type does.
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Chain(Option<Box<Chain>>);

    fn chain(depth: usize) -> Chain {
        (0..depth).fold(Chain(None), |inner, _| Chain(Some(Box::new(inner))))
    }

    /// Drops a deep chain without recursing (the derived drop would, once per level).
    fn unchain(mut chain: Chain) {
        while let Some(inner) = chain.0.take() {
            chain = *inner;
        }
    }

    #[test]
    fn a_forged_depth_bomb_is_an_error_not_a_stack_overflow() {
        // A megabyte of `Some` tags: a million levels, each a few hundred bytes of stack when
        // decoded; without a bound this aborts the process (a 2 MiB thread's stack, as the
        // process backend's supervisor threads have).
        let bomb = vec![1u8; 1 << 20];
        let decoded = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || decode_prefix::<Chain>(&bomb).map(|(chain, _)| unchain(chain)))
            .unwrap()
            .join()
            .unwrap();
        assert!(
            decoded
                .unwrap_err()
                .contains(&format!("more than {MAX_DEPTH} levels"))
        );
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        enum Tree {
            Leaf,
            Node(Box<Tree>, u8),
        }
        let mut bytes = 1u32.to_le_bytes().repeat(1 << 18);
        bytes.extend_from_slice(&0u32.to_le_bytes());
        let err = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || decode_prefix::<Tree>(&bytes).map(|_| ()))
            .unwrap()
            .join()
            .unwrap()
            .unwrap_err();
        assert!(
            err.contains(&format!("more than {MAX_DEPTH} levels")),
            "{err}"
        );
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "hundreds of values up to 128 levels deep: minutes under Miri, and the depth count has no `unsafe`"
    )]
    fn what_encodes_within_the_depth_decodes_and_one_level_more_does_not_encode() {
        // `chain(n)` nests 2n + 1 levels: n + 1 newtype structs and n `Some`s.
        let mut bytes = Vec::new();
        encode_into(&chain(MAX_DEPTH / 2 - 1), &mut bytes).unwrap();
        let (back, used) = decode_prefix::<Chain>(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        unchain(back);
        let err = encode_into(&chain(MAX_DEPTH / 2), &mut Vec::new()).unwrap_err();
        assert!(
            err.contains(&format!("more than {MAX_DEPTH} levels")),
            "{err}"
        );
        // Enums count as a level on both sides, whatever their variant's shape.
        #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        enum Link {
            End,
            Tuple(Box<Link>, u8),
            Struct { next: Box<Link> },
            Newtype(Box<Link>),
        }
        for end in 0..3 {
            let (mut link, mut depth) = (Link::End, 1);
            let mut deepest = None;
            while depth <= MAX_DEPTH + 2 {
                let mut bytes = Vec::new();
                match encode_into(&link, &mut bytes) {
                    Ok(()) => {
                        let (back, _) = decode_prefix::<Link>(&bytes).unwrap();
                        assert!(back == link, "depth {depth}");
                        deepest = Some(depth);
                    }
                    Err(err) => assert!(err.contains("levels"), "{err}"),
                }
                link = match (depth + end) % 3 {
                    0 => Link::Tuple(Box::new(link), 1),
                    1 => Link::Struct {
                        next: Box::new(link),
                    },
                    _ => Link::Newtype(Box::new(link)),
                };
                depth += 1;
            }
            assert_eq!(deepest, Some(MAX_DEPTH));
        }
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "each case loops 2^20 times before the bound: minutes under Miri, and no `unsafe` on the way"
    )]
    fn a_forged_length_of_empty_elements_is_an_error_not_a_hang() {
        // 8 bytes claiming 2^64 - 1 elements that take none: without a bound the decoder
        // loops for centuries (no allocation warns: a `Vec<()>` never allocates).
        let record = u64::MAX.to_le_bytes();
        let err = decode_prefix::<Vec<()>>(&record).unwrap_err();
        assert!(err.contains("elements taking no bytes"), "{err}");
        let err = decode_prefix::<std::collections::BTreeMap<(), ()>>(&record).unwrap_err();
        assert!(err.contains("elements taking no bytes"), "{err}");
        // Spread over many sequences too: 2^20 inner claims of 2^20 each.
        let mut nested = (1u64 << 20).to_le_bytes().to_vec();
        nested.extend_from_slice(&(1u64 << 20).to_le_bytes().repeat(1 << 20));
        let err = decode_prefix::<Vec<Vec<((), ())>>>(&nested).unwrap_err();
        assert!(err.contains("elements taking no bytes"), "{err}");
        // Up to the bound they decode as before.
        let mut bytes = Vec::new();
        encode_into(&vec![(); MAX_EMPTY_PARTS], &mut bytes).unwrap();
        assert_eq!(
            decode_prefix::<Vec<()>>(&bytes).unwrap().0.len(),
            MAX_EMPTY_PARTS
        );
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let mut bytes = Vec::new();
        encode_into(&"hello".to_string(), &mut bytes).unwrap();
        assert!(decode_prefix::<String>(&bytes[..3]).is_err());
    }

    /// bincode 2 with this module's configuration: the reference the format must match.
    fn bincode_bytes<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
        let config = bincode::config::standard().with_fixed_int_encoding();
        let mut out = Vec::new();
        bincode::serde::encode_into_std_write(value, &mut out, config).unwrap();
        out
    }

    /// Encodes `value` here and with bincode, checks the bytes are the same, decodes them
    /// here and with bincode, and checks both give `value` back.
    fn same_as_bincode<T>(value: &T)
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let mut ours = Vec::new();
        encode_into(value, &mut ours).unwrap();
        assert_eq!(ours, bincode_bytes(value), "{value:?}");
        let (back, used): (T, usize) = decode_prefix(&ours).unwrap();
        assert_eq!((&back, used), (value, ours.len()));
        let config = bincode::config::standard().with_fixed_int_encoding();
        let (theirs, _): (T, usize) = bincode::serde::decode_from_slice(&ours, config).unwrap();
        assert_eq!(&theirs, value);
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Nested {
        name: String,
        values: Vec<f64>,
        pairs: Vec<(u32, Vec<f32>)>,
        maybe: Option<Vec<i16>>,
        boxed: Box<[u64]>,
        bytes: Vec<u8>,
        map: std::collections::BTreeMap<String, Vec<i64>>,
        shape: Shape,
        c: char,
        flag: bool,
        wide: (u128, i128),
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    enum Shape {
        Unit,
        Newtype(Vec<f64>),
        Tuple(u8, Vec<u16>),
        Struct { xs: Vec<i32>, label: String },
    }

    #[test]
    fn the_bytes_are_bincodes_and_read_back_both_ways() {
        same_as_bincode(&Vec::<f64>::new());
        same_as_bincode(&vec![1.5f64]);
        same_as_bincode(&vec![0u8, 1, 2, 255, 7]);
        same_as_bincode(&(7u64, vec![-1i8, 2, -3], vec![1.0f32; 3]));
        same_as_bincode(&vec![vec![1.0f64, 2.0], vec![], vec![3.0]]);
        same_as_bincode(&Some(vec![9u32, 8]));
        same_as_bincode(&(u64::MAX, i64::MIN, 'é', '😀', "text".to_string(), ()));
        for shape in [
            Shape::Unit,
            Shape::Newtype(vec![1.0, f64::INFINITY]),
            Shape::Tuple(3, vec![1, 2]),
            Shape::Struct {
                xs: vec![-5, 5],
                label: "l".into(),
            },
        ] {
            same_as_bincode(&Nested {
                name: "n".into(),
                values: (0..1001).map(|i| i as f64 * 0.25).collect(),
                pairs: vec![(1, vec![0.5; 7]), (2, vec![])],
                maybe: Some(vec![1, -1]),
                boxed: vec![1, 2, 3].into_boxed_slice(),
                bytes: vec![1, 2, 3],
                map: [("a".to_string(), vec![1i64, 2])].into_iter().collect(),
                shape,
                c: 'x',
                flag: true,
                wide: (u128::MAX, -1),
            });
        }
    }

    #[test]
    fn slices_and_borrowed_vectors_encode_like_owned_ones() {
        let values = vec![0.1f64, -0.0, 3.0e300];
        let mut from_slice = Vec::new();
        encode_into(&values[..], &mut from_slice).unwrap();
        let mut from_ref = Vec::new();
        encode_into(&(&values[..], &values), &mut from_ref).unwrap();
        assert_eq!(from_slice, bincode_bytes(&values));
        assert_eq!(from_ref, bincode_bytes(&(&values, &values)));
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "tens of megabytes: minutes under Miri (small vectors take the same copy)"
    )]
    fn vectors_big_enough_for_huge_pages_round_trip_at_any_alignment() {
        let values: Vec<f64> = (0..HUGE_PAGES_FROM / 8 + 4099)
            .map(|i| i as f64 * 0.5)
            .collect();
        let words: Box<[u32]> = (0..HUGE_PAGES_FROM as u32 / 4 + 3).collect();
        for offset in [0, 3] {
            let mut bytes = vec![9u8; offset];
            encode_into(&(&values, &words), &mut bytes).unwrap();
            let ((back, back_words), used): ((Vec<f64>, Box<[u32]>), usize) =
                decode_prefix(&bytes[offset..]).unwrap();
            assert_eq!(used, bytes.len() - offset);
            assert!(back == values && back_words == words);
        }
    }

    #[test]
    fn nans_come_back_bit_for_bit() {
        let nans = vec![
            f64::NAN,
            -f64::NAN,
            f64::from_bits(0x7ff0_0000_0000_0001),
            f64::from_bits(0xfff8_dead_beef_0000),
        ];
        let mut bytes = Vec::new();
        encode_into(
            &(nans.clone(), vec![f32::from_bits(0x7fc0_0001)]),
            &mut bytes,
        )
        .unwrap();
        let ((back, back32), _): ((Vec<f64>, Vec<f32>), usize) = decode_prefix(&bytes).unwrap();
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&nans));
        assert_eq!(back32[0].to_bits(), 0x7fc0_0001);
    }

    #[test]
    fn a_vector_of_numbers_claiming_more_than_the_input_is_an_error_before_allocating() {
        for claimed in [3u64, 1 << 40, u64::MAX / 8 + 1, u64::MAX] {
            let mut record = claimed.to_le_bytes().to_vec();
            record.extend_from_slice(&1.5f64.to_le_bytes()[..]);
            record.extend_from_slice(&[1, 2, 3]);
            let err = decode_prefix::<Vec<f64>>(&record).unwrap_err();
            assert!(
                err.contains("claims more than its 19 bytes"),
                "{claimed}: {err}"
            );
            assert!(decode_prefix::<(Vec<u64>,)>(&record).is_err());
            assert!(decode_prefix::<Box<[f32]>>(&record).is_err());
        }
        // A length that fits, then a vector cut short: the bytes that are there are not enough.
        let mut bytes = Vec::new();
        encode_into(&vec![1.0f64, 2.0, 3.0], &mut bytes).unwrap();
        assert!(decode_prefix::<Vec<f64>>(&bytes[..bytes.len() - 1]).is_err());
        assert_eq!(
            decode_prefix::<Vec<f64>>(&bytes).unwrap().0,
            [1.0, 2.0, 3.0]
        );
    }

    #[test]
    fn bad_tags_are_errors() {
        assert!(decode_prefix::<bool>(&[2]).is_err());
        assert!(decode_prefix::<Option<u8>>(&[2, 0]).is_err());
        assert!(decode_prefix::<char>(&[0xff]).is_err());
        assert!(decode_prefix::<char>(&[0xe2, 0x82]).is_err());
        assert!(decode_prefix::<String>(&[1, 0, 0, 0, 0, 0, 0, 0, 0xff]).is_err());
    }

    #[test]
    fn every_cut_and_flipped_byte_of_a_nested_value_is_an_error_or_a_value_never_a_panic() {
        let value = Nested {
            name: "cut".into(),
            values: vec![1.0, f64::NAN, -2.5],
            pairs: vec![(9, vec![0.5; 3])],
            maybe: None,
            boxed: vec![7].into_boxed_slice(),
            bytes: vec![1, 2, 3, 4, 5],
            map: [("k".to_string(), vec![3i64])].into_iter().collect(),
            shape: Shape::Struct {
                xs: vec![1, 2],
                label: "s".into(),
            },
            c: 'q',
            flag: false,
            wide: (1, 2),
        };
        let mut bytes = Vec::new();
        encode_into(&value, &mut bytes).unwrap();
        // Under Miri (which checks the bulk paths' `unsafe` on these hostile bytes) every
        // fifth position and one flip there: all of them took minutes.
        let step = if cfg!(miri) { 5 } else { 1 };
        for cut in (0..bytes.len()).step_by(step) {
            assert!(
                decode_prefix::<Nested>(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let flips = if cfg!(miri) { 1 } else { 8 };
        for at in (0..bytes.len()).step_by(step) {
            for _ in 0..flips {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let mut flipped = bytes.clone();
                flipped[at] ^= (state as u8) | 1;
                let _ = decode_prefix::<Nested>(&flipped);
            }
            let mut huge = bytes.clone();
            huge[at] = 0xff;
            let _ = decode_prefix::<Nested>(&huge);
        }
    }
}
