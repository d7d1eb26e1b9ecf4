//! Frames: `[u32 length][u32 crc32][payload]`, little-endian, with a hard size cap.
//!
//! TLS already protects integrity on the wire; the checksum is here because the same framing
//! is used for the spool's segment files, where it is what detects a torn write after a crash,
//! and because it turns a framing bug into a clear error instead of a confusing decode failure.
//! The cap is checked before any allocation, so a hostile length cannot exhaust memory.

use crate::message::Message;

/// Default largest payload accepted: big enough for a full batch (4 MiB of ops) plus slack.
pub const MAX_FRAME_DEFAULT: u32 = 16 * 1024 * 1024;

/// Bytes before the payload.
pub const HEADER_LEN: usize = 8;

/// Why a frame could not be read. Any of these ends the connection it came from (only that
/// one).
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The announced length exceeds the cap.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: u32,
        /// The cap.
        max: u32,
    },
    /// The checksum does not match the payload.
    #[error("frame checksum mismatch (expected {expected:08x}, computed {actual:08x})")]
    Checksum {
        /// From the header.
        expected: u32,
        /// Over the payload received.
        actual: u32,
    },
    /// The payload is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(#[from] postcard::Error),
}

/// Reads the header: payload length and checksum. Fails if the length exceeds `max`.
pub fn parse_header(header: &[u8; HEADER_LEN], max: u32) -> Result<(u32, u32), FrameError> {
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok((len, crc))
}

/// Checks a payload against the checksum from its header.
pub fn check_payload(payload: &[u8], expected: u32) -> Result<(), FrameError> {
    let actual = crc32fast::hash(payload);
    if actual != expected {
        return Err(FrameError::Checksum { expected, actual });
    }
    Ok(())
}

/// Builds the header for `payload`.
pub fn header_for(payload: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[4..8].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    h
}

/// Encodes a message as one complete frame.
pub fn encode_frame(msg: &Message) -> Vec<u8> {
    let payload = msg.encode();
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header_for(&payload));
    out.extend_from_slice(&payload);
    out
}

/// Decodes one frame from the start of `buf`: `Ok(None)` if more bytes are needed, else the
/// message and the number of bytes it took.
pub fn decode_frame(buf: &[u8], max: u32) -> Result<Option<(Message, usize)>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let (len, crc) = parse_header(buf[..HEADER_LEN].try_into().expect("header length"), max)?;
    let end = HEADER_LEN + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    let payload = &buf[HEADER_LEN..end];
    check_payload(payload, crc)?;
    Ok(Some((Message::decode(payload)?, end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_partial() {
        let f = encode_frame(&Message::Ack { seq: 77 });
        assert!(decode_frame(&f[..f.len() - 1], MAX_FRAME_DEFAULT).unwrap().is_none());
        let (m, n) = decode_frame(&f, MAX_FRAME_DEFAULT).unwrap().unwrap();
        assert_eq!(m, Message::Ack { seq: 77 });
        assert_eq!(n, f.len());
    }

    #[test]
    fn rejects_oversize_before_reading_payload() {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = decode_frame(&h, MAX_FRAME_DEFAULT).unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
    }

    #[test]
    fn rejects_corruption_and_garbage() {
        let mut f = encode_frame(&Message::Ack { seq: 77 });
        let last = f.len() - 1;
        f[last] ^= 0xff;
        assert!(matches!(decode_frame(&f, MAX_FRAME_DEFAULT), Err(FrameError::Checksum { .. })));
        let payload = [0xffu8; 5];
        let mut g = header_for(&payload).to_vec();
        g.extend_from_slice(&payload);
        assert!(matches!(decode_frame(&g, MAX_FRAME_DEFAULT), Err(FrameError::Malformed(_))));
    }
}
