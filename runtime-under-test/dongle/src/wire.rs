//! Frames: the unit of the session protocol, before chunking into HID reports.
//!
//! Layout (little endian): `"VD"` magic, version (1 byte), kind (1 byte), session id (u32),
//! counter (u64), then the body. The 16-byte header is the associated data of encrypted bodies.

use serde::{Deserialize, Serialize};

/// Protocol version carried in every frame.
pub const PROTOCOL_VERSION: u8 = 1;

/// Length of the frame header.
pub const FRAME_HEADER_LEN: usize = 16;

/// Largest frame accepted or produced, header included.
pub const MAX_FRAME_LEN: usize = 4096;

const MAGIC: [u8; 2] = *b"VD";

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// Runtime → dongle: open a session (plaintext).
    Hello,
    /// Dongle → runtime: session opened, signed by the device key.
    HelloAccept,
    /// Dongle → runtime: session refused (locked out), signed by the device key.
    HelloRefused,
    /// Runtime → dongle: an encrypted command.
    Request,
    /// Dongle → runtime: an encrypted answer.
    Response,
    /// Dongle → runtime: a plaintext protocol fault.
    Fault,
}

impl FrameKind {
    fn code(self) -> u8 {
        match self {
            Self::Hello => 1,
            Self::HelloAccept => 2,
            Self::HelloRefused => 3,
            Self::Request => 4,
            Self::Response => 5,
            Self::Fault => 6,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::Hello,
            2 => Self::HelloAccept,
            3 => Self::HelloRefused,
            4 => Self::Request,
            5 => Self::Response,
            6 => Self::Fault,
            _ => return None,
        })
    }
}

/// Why the dongle refused a frame outside any session answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
pub enum FaultCode {
    /// The frame could not be parsed.
    #[error("Malformed frame")]
    Malformed,
    /// The protocol version is not spoken.
    #[error("Unsupported protocol version")]
    UnsupportedVersion,
    /// No such session (never opened, or lost in a power cycle or bus reset).
    #[error("Unknown session")]
    UnknownSession,
    /// The frame failed authentication.
    #[error("Frame failed authentication")]
    AuthenticationFailed,
    /// The frame's counter was already used.
    #[error("Replayed frame")]
    Replayed,
    /// The frame's counter skips ahead.
    #[error("Frame out of order")]
    OutOfOrder,
}

impl FaultCode {
    /// The single-byte wire code.
    pub fn code(self) -> u8 {
        match self {
            Self::Malformed => 1,
            Self::UnsupportedVersion => 2,
            Self::UnknownSession => 3,
            Self::AuthenticationFailed => 4,
            Self::Replayed => 5,
            Self::OutOfOrder => 6,
        }
    }

    /// Parses a wire code.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::Malformed,
            2 => Self::UnsupportedVersion,
            3 => Self::UnknownSession,
            4 => Self::AuthenticationFailed,
            5 => Self::Replayed,
            6 => Self::OutOfOrder,
            _ => return None,
        })
    }
}

/// Bytes that are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than a header.
    #[error("Frame too short: {0} bytes")]
    TooShort(usize),
    /// Longer than [`MAX_FRAME_LEN`].
    #[error("Frame too long: {0} bytes")]
    TooLong(usize),
    /// Wrong magic bytes.
    #[error("Not a dongle frame")]
    BadMagic,
    /// A protocol version this crate does not speak.
    #[error("Unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// Unknown frame kind.
    #[error("Unknown frame kind {0}")]
    UnknownKind(u8),
}

/// A parsed frame borrowing its body from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// What the frame carries.
    pub kind: FrameKind,
    /// Session id (0 for hello).
    pub session: u32,
    /// Frame counter within the session.
    pub counter: u64,
    /// The body, plaintext or sealed depending on the kind.
    pub body: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Parses a frame; never panics, whatever the input.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, FrameError> {
        if bytes.len() > MAX_FRAME_LEN {
            return Err(FrameError::TooLong(bytes.len()));
        }
        let Some((header, body)) = bytes.split_first_chunk::<FRAME_HEADER_LEN>() else {
            return Err(FrameError::TooShort(bytes.len()));
        };
        if header[0..2] != MAGIC {
            return Err(FrameError::BadMagic);
        }
        if header[2] != PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion(header[2]));
        }
        let kind = FrameKind::from_code(header[3]).ok_or(FrameError::UnknownKind(header[3]))?;
        let session = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let mut counter = [0u8; 8];
        counter.copy_from_slice(&header[8..16]);
        Ok(Self {
            kind,
            session,
            counter: u64::from_le_bytes(counter),
            body,
        })
    }

    /// The 16-byte header.
    pub fn header(&self) -> [u8; FRAME_HEADER_LEN] {
        header(self.kind, self.session, self.counter)
    }

    /// Serialises the frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(FRAME_HEADER_LEN + self.body.len());
        bytes.extend_from_slice(&self.header());
        bytes.extend_from_slice(self.body);
        bytes
    }
}

/// The header bytes for a frame.
pub(crate) fn header(kind: FrameKind, session: u32, counter: u64) -> [u8; FRAME_HEADER_LEN] {
    let mut header = [0u8; FRAME_HEADER_LEN];
    header[0..2].copy_from_slice(&MAGIC);
    header[2] = PROTOCOL_VERSION;
    header[3] = kind.code();
    header[4..8].copy_from_slice(&session.to_le_bytes());
    header[8..16].copy_from_slice(&counter.to_le_bytes());
    header
}

/// A fault frame.
pub(crate) fn fault_frame(session: u32, counter: u64, fault: FaultCode) -> Vec<u8> {
    Frame {
        kind: FrameKind::Fault,
        session,
        counter,
        body: &[fault.code()],
    }
    .encode()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[test]
    fn round_trip() {
        let frame = Frame {
            kind: FrameKind::Request,
            session: 7,
            counter: 9,
            body: b"abc",
        };
        let bytes = frame.encode();
        assert_eq!(bytes.len(), FRAME_HEADER_LEN + 3);
        assert_eq!(Frame::decode(&bytes).unwrap(), frame);
    }

    #[rstest]
    #[case(vec![], FrameError::TooShort(0))]
    #[case(vec![b'V', b'D', 1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], FrameError::TooShort(15))]
    #[case(vec![b'X', b'D', 1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], FrameError::BadMagic)]
    #[case(vec![b'V', b'D', 2, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], FrameError::UnsupportedVersion(2))]
    #[case(vec![b'V', b'D', 1, 99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], FrameError::UnknownKind(99))]
    #[case(vec![0; MAX_FRAME_LEN + 1], FrameError::TooLong(MAX_FRAME_LEN + 1))]
    fn malformed_frames_refused(#[case] bytes: Vec<u8>, #[case] expected: FrameError) {
        assert_eq!(Frame::decode(&bytes), Err(expected));
    }

    #[test]
    fn fault_codes_round_trip() {
        for code in 0..=u8::MAX {
            if let Some(fault) = FaultCode::from_code(code) {
                assert_eq!(fault.code(), code);
            }
        }
        assert_eq!(FaultCode::from_code(0), None);
    }
}
