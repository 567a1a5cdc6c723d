//! The one place that knows the codec: bincode 2 in serde mode, fixed-width little-endian
//! integers (cheaper to encode than varints for the small numeric payloads tasks carry).
//!
//! bincode is unmaintained (its 3.0 release refuses to compile); keeping every call here means
//! another codec replaces it in this file alone.

use serde::Serialize;
use serde::de::DeserializeOwned;

type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Fixint,
    bincode::config::NoLimit,
>;

fn config() -> Config {
    bincode::config::standard().with_fixed_int_encoding()
}

/// Appends the encoding of `value` to `out`.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), String> {
    bincode::serde::encode_into_std_write(value, out, config())
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The most bytes one value's encoding may take: frames carry record lengths as `u32`.
pub const MAX_VALUE_BYTES: usize = u32::MAX as usize;

/// Decodes one value from the front of `bytes`, returning it and the bytes it used.
///
/// Bytes may come from another process, so the decoder is held to a budget derived from
/// their length: a length field that claims more than the input could hold (a `String` of
/// 2^46 bytes in a 13-byte record) is an error before anything is allocated, never an abort.
/// The budget is the next of 64 KiB, 1 MiB, 16 MiB, 256 MiB and 4 GiB at or above
/// `bytes.len()` (bincode's limits are constants, so it comes in steps): in serde mode every
/// byte the decoder claims is a byte it reads, so a well-formed value always fits, and what a
/// corrupt one can make it allocate is bounded by 16 times its input (at least 64 KiB).
pub fn decode_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), String> {
    const KIB64: usize = 1 << 16;
    const MIB1: usize = 1 << 20;
    const MIB16: usize = 1 << 24;
    const MIB256: usize = 1 << 28;
    let n = bytes.len();
    let decoded = if n <= KIB64 {
        bincode::serde::decode_from_slice(bytes, config().with_limit::<KIB64>())
    } else if n <= MIB1 {
        bincode::serde::decode_from_slice(bytes, config().with_limit::<MIB1>())
    } else if n <= MIB16 {
        bincode::serde::decode_from_slice(bytes, config().with_limit::<MIB16>())
    } else if n <= MIB256 {
        bincode::serde::decode_from_slice(bytes, config().with_limit::<MIB256>())
    } else if n <= MAX_VALUE_BYTES {
        bincode::serde::decode_from_slice(bytes, config().with_limit::<MAX_VALUE_BYTES>())
    } else {
        return Err(format!("{n} bytes is more than one value may take (4 GiB)"));
    };
    decoded.map_err(|e| match e {
        bincode::error::DecodeError::LimitExceeded => format!(
            "a length inside the value claims more than its {} bytes could hold (corrupt or \
             forged input)",
            bytes.len()
        ),
        other => other.to_string(),
    })
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
        ignore = "megabyte strings: minutes under Miri, and codec.rs has no unsafe"
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

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let mut bytes = Vec::new();
        encode_into(&"hello".to_string(), &mut bytes).unwrap();
        assert!(decode_prefix::<String>(&bytes[..3]).is_err());
    }
}
