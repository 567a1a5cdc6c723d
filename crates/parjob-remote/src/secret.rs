//! The secret that authenticates both ends of one worker's handshake.
//!
//! Whoever can reach a backend's rendezvous point (a socket path, a port) could otherwise greet
//! the driver as its worker and receive every task, or greet a worker as its driver and have it
//! call functions by offset. So the driver makes a fresh [`HandshakeSecret`] for every worker it
//! starts and hands it over privately, never through the rendezvous itself (the process backend
//! puts it in the worker's environment, which only the same user can read). Each side then
//! proves it knows its half: the worker's first message carries [`HandshakeSecret::worker`], the
//! driver's [`Welcome`](crate::Welcome) carries [`HandshakeSecret::driver`]. Two halves rather
//! than one value, so that a rogue that received a worker's greeting cannot replay it as the
//! driver's proof.

use std::fmt;

use crate::RemoteError;

/// Sixteen random bytes, compared in constant time. Its `Debug` form does not show them.
#[derive(Clone, Copy, Eq)]
pub struct Nonce([u8; Nonce::LEN]);

impl Nonce {
    /// Length in bytes.
    pub const LEN: usize = 16;

    /// A nonce of the given bytes (as read from a message).
    pub fn from_bytes(bytes: [u8; Nonce::LEN]) -> Nonce {
        Nonce(bytes)
    }

    /// The bytes, to put in a message.
    pub fn to_bytes(self) -> [u8; Nonce::LEN] {
        self.0
    }
}

/// In constant time: a peer learns nothing from how long a refusal took.
impl PartialEq for Nonce {
    fn eq(&self, other: &Nonce) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }
}

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Nonce(..)")
    }
}

/// The secret of one worker's handshake: one [`Nonce`] each side must show the other.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct HandshakeSecret {
    /// What the worker shows the driver (in the process backend, in its `Hello`).
    pub worker: Nonce,
    /// What the driver shows the worker, in its [`Welcome`](crate::Welcome).
    pub driver: Nonce,
}

impl HandshakeSecret {
    /// Length of [`to_hex`](HandshakeSecret::to_hex)'s text.
    pub const HEX_LEN: usize = 4 * Nonce::LEN;

    /// A fresh secret from the kernel's random number generator (`getrandom(2)`).
    ///
    /// # Errors
    /// When the kernel cannot provide random bytes (no `getrandom` and no `/dev/urandom`).
    pub fn random() -> std::io::Result<HandshakeSecret> {
        let mut bytes = [0u8; 2 * Nonce::LEN];
        fill_random(&mut bytes)?;
        Ok(HandshakeSecret::from_array(bytes))
    }

    fn from_array(bytes: [u8; 2 * Nonce::LEN]) -> HandshakeSecret {
        let mut worker = [0; Nonce::LEN];
        let mut driver = [0; Nonce::LEN];
        worker.copy_from_slice(&bytes[..Nonce::LEN]);
        driver.copy_from_slice(&bytes[Nonce::LEN..]);
        HandshakeSecret {
            worker: Nonce(worker),
            driver: Nonce(driver),
        }
    }

    /// The secret as lowercase hex (worker half first), to hand to the worker as text.
    pub fn to_hex(&self) -> String {
        self.worker
            .0
            .iter()
            .chain(self.driver.0.iter())
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Reads what [`to_hex`](HandshakeSecret::to_hex) wrote.
    ///
    /// # Errors
    /// [`RemoteError::Malformed`] unless `text` is exactly [`HEX_LEN`](Self::HEX_LEN) hex
    /// digits.
    pub fn from_hex(text: &str) -> Result<HandshakeSecret, RemoteError> {
        let malformed = |reason: String| RemoteError::Malformed {
            message: "handshake secret",
            reason,
        };
        if text.len() != HandshakeSecret::HEX_LEN {
            return Err(malformed(format!(
                "{} characters where {} hex digits are needed",
                text.len(),
                HandshakeSecret::HEX_LEN
            )));
        }
        let mut bytes = [0u8; 2 * Nonce::LEN];
        for (byte, pair) in bytes.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
            let digits = std::str::from_utf8(pair).ok();
            *byte = digits
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .ok_or_else(|| malformed("not hex digits".into()))?;
        }
        Ok(HandshakeSecret::from_array(bytes))
    }
}

/// Fills `buf` from `getrandom(2)`, or `/dev/urandom` on a kernel without it.
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes for the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let error = std::io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOSYS) => {
                    use std::io::Read;
                    return std::fs::File::open("/dev/urandom")?.read_exact(rest);
                }
                _ => return Err(error),
            }
        }
        // Never more than asked for; `n >= 0` here.
        filled += n.unsigned_abs();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_survives_its_text_form_and_bad_text_is_refused() {
        let secret = HandshakeSecret::random().unwrap();
        let text = secret.to_hex();
        assert_eq!(text.len(), HandshakeSecret::HEX_LEN);
        assert_eq!(HandshakeSecret::from_hex(&text), Ok(secret));
        assert!(HandshakeSecret::from_hex(&text[1..]).is_err());
        assert!(HandshakeSecret::from_hex(&format!("{}zz", &text[2..])).is_err());
        assert!(HandshakeSecret::from_hex("").is_err());
        // A multi-byte character must not split a digit pair.
        assert!(HandshakeSecret::from_hex(&format!("é{}", &text[2..])).is_err());
    }

    #[test]
    fn secrets_are_fresh_and_their_halves_differ() {
        let a = HandshakeSecret::random().unwrap();
        let b = HandshakeSecret::random().unwrap();
        assert_ne!(a, b);
        assert_ne!(a.worker, a.driver);
        assert_eq!(format!("{:?}", a.worker), "Nonce(..)");
    }
}
