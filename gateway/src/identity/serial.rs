//! Certificate serial numbers. Promises that every serial the gateway writes is 128 random bits
//! from the system CSPRNG, positive, never zero, and always 16 bytes on the wire.

use std::fmt;

use aws_lc_rs::rand::{SecureRandom, SystemRandom};

/// Why a serial could not be made or parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SerialError {
    /// The system random number generator failed; nothing may be issued without it.
    #[error("the system random number generator failed")]
    Random,
    /// Not exactly 32 hexadecimal characters.
    #[error("a serial is 32 hexadecimal characters")]
    NotHex,
    /// The first byte is zero or has its top bit set: not a serial this gateway issues.
    #[error("serial {0} is outside the range this gateway issues (first byte 01..7f)")]
    OutOfRange(String),
}

impl SerialError {
    /// A stable kebab-case code for metrics, audit entries and API errors.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Random => "random-unavailable",
            Self::NotHex => "serial-not-hex",
            Self::OutOfRange(_) => "serial-out-of-range",
        }
    }
}

/// A random 128-bit certificate serial.
///
/// Invariant: the first byte is in `0x01..=0x7f`, so the DER INTEGER is positive, never zero, and
/// exactly 16 bytes long (no sign padding, no stripped leading zero). Display is 32 lowercase hex
/// characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Serial([u8; 16]);

impl Serial {
    /// Draws a fresh serial from the system CSPRNG.
    ///
    /// Rejection sampling keeps the distribution uniform over the allowed range: a draw whose
    /// first byte is zero after clearing the top bit (1 in 128) is discarded.
    pub fn random() -> Result<Self, SerialError> {
        let rng = SystemRandom::new();
        loop {
            let mut bytes = [0u8; 16];
            rng.fill(&mut bytes).map_err(|_| SerialError::Random)?;
            bytes[0] &= 0x7f;
            if bytes[0] != 0 {
                return Ok(Self(bytes));
            }
        }
    }

    /// Parses the 32-character hex form that [`fmt::Display`] writes (either case accepted).
    pub fn parse_hex(text: &str) -> Result<Self, SerialError> {
        let mut bytes = [0u8; 16];
        hex::decode_to_slice(text, &mut bytes).map_err(|_| SerialError::NotHex)?;
        if !(0x01..=0x7f).contains(&bytes[0]) {
            return Err(SerialError::OutOfRange(text.to_ascii_lowercase()));
        }
        Ok(Self(bytes))
    }

    /// The 16 big-endian bytes, exactly as encoded in the certificate.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_serials_are_positive_nonzero_and_distinct() {
        let serials: Vec<Serial> = (0..512).map(|_| Serial::random().unwrap()).collect();
        for s in &serials {
            assert!((0x01..=0x7f).contains(&s.as_bytes()[0]), "{s}");
            assert_eq!(s.to_string().len(), 32);
        }
        let distinct: std::collections::HashSet<_> = serials.iter().collect();
        assert_eq!(distinct.len(), serials.len());
    }

    #[test]
    fn hex_round_trips_and_is_lowercase() {
        let s = Serial::random().unwrap();
        let text = s.to_string();
        assert_eq!(text, text.to_ascii_lowercase());
        assert_eq!(Serial::parse_hex(&text).unwrap(), s);
        assert_eq!(Serial::parse_hex(&text.to_ascii_uppercase()).unwrap(), s);
        assert_eq!(format!("{s:?}"), format!("Serial({text})"));
    }

    #[test]
    fn parse_refuses_wrong_length_non_hex_and_out_of_range() {
        let ok = "0123456789abcdef0123456789abcdef";
        assert!(Serial::parse_hex(ok).is_ok());
        for bad in [
            "",
            "01",
            &ok[..31],
            &format!("{ok}00"),
            "0g23456789abcdef0123456789abcdef",
        ] {
            assert_eq!(
                Serial::parse_hex(bad).unwrap_err(),
                SerialError::NotHex,
                "{bad:?}"
            );
        }
        for bad in [
            "00000000000000000000000000000000",
            "00ffffffffffffffffffffffffffffff",
            "80000000000000000000000000000001",
        ] {
            assert_eq!(
                Serial::parse_hex(bad).unwrap_err(),
                SerialError::OutOfRange(bad.to_string())
            );
        }
    }
}
