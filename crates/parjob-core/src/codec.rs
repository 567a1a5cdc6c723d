//! The one place that knows the codec: bincode 2 in serde mode, fixed-width little-endian
//! integers (cheaper to encode than varints for the small numeric payloads tasks carry).
//!
//! bincode is unmaintained (its 3.0 release refuses to compile); keeping every call here means
//! another codec replaces it in this file alone.

use serde::Serialize;
use serde::de::DeserializeOwned;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_fixed_int_encoding()
}

/// Appends the encoding of `value` to `out`.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), String> {
    bincode::serde::encode_into_std_write(value, out, config())
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Decodes one value from the front of `bytes`, returning it and the bytes it used.
pub fn decode_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), String> {
    bincode::serde::decode_from_slice(bytes, config()).map_err(|e| e.to_string())
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
    fn truncated_input_is_an_error_not_a_panic() {
        let mut bytes = Vec::new();
        encode_into(&"hello".to_string(), &mut bytes).unwrap();
        assert!(decode_prefix::<String>(&bytes[..3]).is_err());
    }
}
