//! The fixed prefix that opens every frame.
//!
//! It lives outside the rkyv archive so that a peer can reject a wrong magic,
//! an unknown version or an oversized length from 20 bytes, before it
//! allocates anything or touches the archive.
//!
//! ```text
//! offset size field
//!      0    4 magic        b"QSAR"
//!      4    2 version      u16 little-endian (PROTOCOL_VERSION)
//!      6    1 kind         1 = request, 2 = response
//!      7    1 flags        reserved, must be 0
//!      8    4 header_len   u32 little-endian, length of the rkyv header archive
//!     12    8 payload_len  u64 little-endian, length of the payload that follows
//! ```

use thiserror::Error;

use crate::{Limits, PROTOCOL_VERSION};

/// The magic bytes that open every frame.
pub const MAGIC: [u8; 4] = *b"QSAR";

/// Length in bytes of the fixed prefix.
pub const PREFIX_LEN: usize = 20;

/// Which side wrote a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A call from client to server.
    Request = 1,
    /// The server's answer.
    Response = 2,
}

/// A decoded and checked frame prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    /// Request or response.
    pub kind: FrameKind,
    /// Length of the archived header that follows the prefix.
    pub header_len: u32,
    /// Length of the payload that follows the header.
    pub payload_len: u64,
}

/// Why a frame prefix was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The first four bytes are not `QSAR`.
    #[error("bad magic {found:02x?}: not a Quasar frame")]
    BadMagic {
        /// The bytes found instead.
        found: [u8; 4],
    },
    /// The peer speaks a protocol version this build does not.
    #[error("unsupported protocol version {found} (this peer speaks {supported})")]
    UnsupportedVersion {
        /// The version in the prefix.
        found: u16,
        /// The version this build speaks.
        supported: u16,
    },
    /// The kind byte is neither request nor response, or not the one expected.
    #[error("unexpected frame kind {found}")]
    UnexpectedKind {
        /// The kind byte found.
        found: u8,
    },
    /// Reserved flag bits were set.
    #[error("reserved flags {found:#04x} must be zero")]
    ReservedFlags {
        /// The flags byte found.
        found: u8,
    },
    /// The header length is zero.
    #[error("empty header")]
    EmptyHeader,
    /// The header is longer than the configured limit.
    #[error("header of {len} bytes exceeds the limit of {max} bytes")]
    HeaderTooLarge {
        /// Declared length.
        len: u32,
        /// Configured maximum.
        max: u32,
    },
    /// The payload is longer than the configured limit.
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge {
        /// Declared length.
        len: u64,
        /// Configured maximum.
        max: u64,
    },
}

impl Prefix {
    /// Encodes the prefix with this build's protocol version.
    pub fn encode(&self) -> [u8; PREFIX_LEN] {
        let mut out = [0u8; PREFIX_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out[6] = self.kind as u8;
        out[7] = 0;
        out[8..12].copy_from_slice(&self.header_len.to_le_bytes());
        out[12..20].copy_from_slice(&self.payload_len.to_le_bytes());
        out
    }

    /// The payload length an encoded prefix declares, unchecked: for
    /// asserting what this side wrote, never for reading a peer's (that is
    /// [`Prefix::decode`]). `None` if `bytes` is shorter than a prefix.
    pub(crate) fn declared_payload_len(bytes: &[u8]) -> Option<u64> {
        let at = bytes.get(12..PREFIX_LEN)?;
        Some(u64::from_le_bytes(at.try_into().ok()?))
    }

    /// Decodes a prefix and checks it against `expected` kind and `limits`.
    ///
    /// # Errors
    /// Any [`FrameError`]: the checks run in the order of the fields, so a
    /// frame from another protocol fails on its magic first.
    pub fn decode(
        bytes: &[u8; PREFIX_LEN],
        expected: FrameKind,
        limits: &Limits,
    ) -> Result<Self, FrameError> {
        let [
            m0,
            m1,
            m2,
            m3,
            v0,
            v1,
            kind,
            flags,
            h0,
            h1,
            h2,
            h3,
            p0,
            p1,
            p2,
            p3,
            p4,
            p5,
            p6,
            p7,
        ] = *bytes;
        let magic = [m0, m1, m2, m3];
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let version = u16::from_le_bytes([v0, v1]);
        if version != PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion {
                found: version,
                supported: PROTOCOL_VERSION,
            });
        }
        if kind != expected as u8 {
            return Err(FrameError::UnexpectedKind { found: kind });
        }
        if flags != 0 {
            return Err(FrameError::ReservedFlags { found: flags });
        }
        let header_len = u32::from_le_bytes([h0, h1, h2, h3]);
        if header_len == 0 {
            return Err(FrameError::EmptyHeader);
        }
        if header_len > limits.max_header_len {
            return Err(FrameError::HeaderTooLarge {
                len: header_len,
                max: limits.max_header_len,
            });
        }
        let payload_len = u64::from_le_bytes([p0, p1, p2, p3, p4, p5, p6, p7]);
        if payload_len > limits.max_payload_len {
            return Err(FrameError::PayloadTooLarge {
                len: payload_len,
                max: limits.max_payload_len,
            });
        }
        Ok(Self {
            kind: expected,
            header_len,
            payload_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix() -> Prefix {
        Prefix {
            kind: FrameKind::Request,
            header_len: 100,
            payload_len: 4096,
        }
    }

    #[test]
    fn round_trip() {
        let bytes = prefix().encode();
        assert_eq!(
            Prefix::decode(&bytes, FrameKind::Request, &Limits::default()),
            Ok(prefix())
        );
        assert_eq!(
            Prefix::declared_payload_len(&bytes),
            Some(prefix().payload_len)
        );
        assert_eq!(Prefix::declared_payload_len(&bytes[..PREFIX_LEN - 1]), None);
    }

    #[test]
    fn each_field_is_checked() {
        let limits = Limits::default();
        let good = prefix().encode();

        let mut b = good;
        b[0] = b'X';
        assert!(matches!(
            Prefix::decode(&b, FrameKind::Request, &limits),
            Err(FrameError::BadMagic { .. })
        ));

        let mut b = good;
        b[4..6].copy_from_slice(&7u16.to_le_bytes());
        assert_eq!(
            Prefix::decode(&b, FrameKind::Request, &limits),
            Err(FrameError::UnsupportedVersion {
                found: 7,
                supported: PROTOCOL_VERSION
            })
        );

        assert_eq!(
            Prefix::decode(&good, FrameKind::Response, &limits),
            Err(FrameError::UnexpectedKind { found: 1 })
        );

        let mut b = good;
        b[7] = 0x80;
        assert_eq!(
            Prefix::decode(&b, FrameKind::Request, &limits),
            Err(FrameError::ReservedFlags { found: 0x80 })
        );

        let mut b = good;
        b[8..12].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(
            Prefix::decode(&b, FrameKind::Request, &limits),
            Err(FrameError::EmptyHeader)
        );

        let mut b = good;
        b[8..12].copy_from_slice(&(limits.max_header_len + 1).to_le_bytes());
        assert!(matches!(
            Prefix::decode(&b, FrameKind::Request, &limits),
            Err(FrameError::HeaderTooLarge { .. })
        ));

        let mut b = good;
        b[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            Prefix::decode(&b, FrameKind::Request, &limits),
            Err(FrameError::PayloadTooLarge { .. })
        ));
    }
}
