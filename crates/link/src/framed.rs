//! Message frames over a byte stream.
//!
//! The same reader and writer serve TLS connections, plain in-process pipes (the embedded
//! target) and the hostile test clients, so the limits are enforced in one place. Byte counters
//! count what actually crosses the stream (frame headers included), which is what "bytes on the
//! wire" means in status and tests.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use doppel_proto::frame::{HEADER_LEN, check_payload, header_for, parse_header};
use doppel_proto::{FrameError, Message, PROTOCOL_VERSION, Refusal};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Link errors.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The connection failed or closed.
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    /// The peer sent a bad frame.
    #[error("bad frame from peer: {0}")]
    Frame(#[from] FrameError),
    /// The peer closed the connection (between frames).
    #[error("peer closed the connection")]
    Closed,
    /// The peer refused us.
    #[error("refused by target: {0}")]
    Refused(Refusal),
    /// The peer said something out of place.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The peer's handshake announces another protocol version, and its fields do not decode
    /// in this one.
    #[error("the peer speaks protocol version {peer}, this build speaks {ours}")]
    Version {
        /// The version the peer announced.
        peer: u32,
        /// This build's version.
        ours: u32,
    },
    /// The peer went quiet for too long.
    #[error("peer silent for {0:?}; connection presumed dead")]
    Timeout(std::time::Duration),
}

/// A shared count of bytes.
#[derive(Debug, Default, Clone)]
pub struct ByteCounter(Arc<AtomicU64>);

impl ByteCounter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The current total.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Room reserved for a frame before its bytes arrive.
const INITIAL_BUF: usize = 64 << 10;

/// Reads frames, refusing any larger than the cap before allocating for it.
pub struct FrameReader<R> {
    r: R,
    max: u32,
    counter: ByteCounter,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps `r` (buffer it first if it is a raw socket).
    pub fn new(r: R, max: u32, counter: ByteCounter) -> Self {
        FrameReader { r, max, counter, buf: Vec::new() }
    }

    /// Reads the next message; [`LinkError::Closed`] on a clean end of stream.
    pub async fn read(&mut self) -> Result<Message, LinkError> {
        let mut header = [0u8; HEADER_LEN];
        match self.r.read_exact(&mut header[..1]).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(LinkError::Closed),
            Err(e) => return Err(e.into()),
        }
        self.r.read_exact(&mut header[1..]).await?;
        let (len, crc) = parse_header(&header, self.max)?;
        // The buffer grows with the bytes that actually arrive, not with the length the
        // header announces: a header alone must not make this side hold a whole frame.
        self.buf.clear();
        self.buf.reserve((len as usize).min(INITIAL_BUF));
        let got = (&mut self.r).take(len as u64).read_to_end(&mut self.buf).await?;
        if got < len as usize {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        self.counter.add((HEADER_LEN + len as usize) as u64);
        check_payload(&self.buf, crc)?;
        let msg = Message::decode(&self.buf).map_err(|e| match Message::peek_protocol(&self.buf) {
            Some(peer) if peer != PROTOCOL_VERSION => LinkError::Version { peer, ours: PROTOCOL_VERSION },
            _ => FrameError::Malformed(e).into(),
        })?;
        if self.buf.capacity() > 1 << 20 {
            self.buf = Vec::new();
        }
        Ok(msg)
    }
}

/// Writes frames.
pub struct FrameWriter<W> {
    w: W,
    counter: ByteCounter,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Wraps `w` (buffer it first if it is a raw socket).
    pub fn new(w: W, counter: ByteCounter) -> Self {
        FrameWriter { w, counter }
    }

    /// Writes one message (not flushed: call [`FrameWriter::flush`] when a burst is done).
    pub async fn send(&mut self, msg: &Message) -> Result<(), LinkError> {
        let payload = msg.encode();
        self.w.write_all(&header_for(&payload)).await?;
        self.w.write_all(&payload).await?;
        self.counter.add((HEADER_LEN + payload.len()) as u64);
        Ok(())
    }

    /// Writes one message and flushes.
    pub async fn send_now(&mut self, msg: &Message) -> Result<(), LinkError> {
        self.send(msg).await?;
        self.flush().await
    }

    /// Flushes buffered frames to the stream.
    pub async fn flush(&mut self) -> Result<(), LinkError> {
        self.w.flush().await?;
        Ok(())
    }

    /// Shuts the write side down.
    pub async fn shutdown(&mut self) -> Result<(), LinkError> {
        self.w.shutdown().await?;
        Ok(())
    }

    /// The underlying writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }
}

/// Writes every message from `rx` (batching those ready together into one flush), and a
/// heartbeat whenever nothing was sent for `heartbeat`, so the peer can tell a quiet link from
/// a dead one. Ends, shutting the stream down, when `rx` closes. An item is dropped once its
/// message is written, so what it carries besides (a permit of a memory budget, say) is held
/// exactly as long as the message waits.
pub async fn write_pump<W: AsyncWrite + Unpin, T: std::borrow::Borrow<Message>>(
    mut writer: FrameWriter<W>,
    mut rx: tokio::sync::mpsc::Receiver<T>,
    heartbeat: std::time::Duration,
) -> Result<(), LinkError> {
    loop {
        match tokio::time::timeout(heartbeat, rx.recv()).await {
            Ok(Some(msg)) => {
                writer.send(msg.borrow()).await?;
                while let Ok(m) = rx.try_recv() {
                    writer.send(m.borrow()).await?;
                }
                writer.flush().await?;
            }
            Ok(None) => {
                let _ = writer.shutdown().await;
                return Ok(());
            }
            Err(_) => writer.send_now(&Message::Heartbeat { time_us: now_us() }).await?,
        }
    }
}

/// Microseconds since the epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn roundtrip_counts_and_caps() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (ca, cb) = (ByteCounter::default(), ByteCounter::default());
        let mut w = FrameWriter::new(a, ca.clone());
        let mut r = FrameReader::new(b, 1024, cb.clone());
        w.send_now(&Message::Ack { seq: 9 }).await.unwrap();
        assert_eq!(r.read().await.unwrap(), Message::Ack { seq: 9 });
        assert_eq!(ca.get(), cb.get());
        w.send_now(&Message::Goodbye { reason: "x".repeat(2000) }).await.unwrap();
        assert!(matches!(r.read().await, Err(LinkError::Frame(FrameError::TooLarge { .. }))));
        drop(w);
        let (a, b) = tokio::io::duplex(64);
        drop(a);
        let mut r = FrameReader::new(b, 1024, ByteCounter::default());
        assert!(matches!(r.read().await, Err(LinkError::Closed)));
    }
}
