//! A Network Block Device server: the part of the protocol QEMU's NBD client speaks to a
//! mirror target (fixed newstyle handshake, `NBD_OPT_GO`/`NBD_OPT_EXPORT_NAME`, simple
//! replies, read, write with FUA, flush, trim, write-zeroes).
//!
//! Why not a crate: the one NBD server crate (`nbd`) serves a single `Read + Write + Seek`
//! object, one request at a time, with no hook between receiving a write and replying to it,
//! which is exactly where the capture must sequence the write and, in sync mode, wait for the
//! target. The protocol part is small and specified
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>); the parsing below is
//! pure and tested on bytes.
//!
//! Requests are read and carried out in the order they arrive, one connection per disk, so
//! the order in which writes are sequenced is the order QEMU issued them (QEMU's mirror never
//! has two overlapping writes in flight). Replies that must wait (sync mode) are sent by a
//! second thread as the target acknowledges, in arrival order; the others at once, by the
//! reading thread.

use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::mpsc;

use parking_lot::Mutex;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TFLAG_HAS_FLAGS: u16 = 1;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
const TFLAG_SEND_FUA: u16 = 1 << 3;
const TFLAG_SEND_TRIM: u16 = 1 << 5;
const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
const TFLAGS: u16 =
    TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;

/// `NBD_CMD_FLAG_FUA`: the write must be durable when it is acknowledged.
pub const CMD_FLAG_FUA: u16 = 1;
/// `NBD_CMD_FLAG_NO_HOLE`: zeroes must be written, not punched.
pub const CMD_FLAG_NO_HOLE: u16 = 2;

/// The largest request payload accepted (QEMU sends at most 32 MiB).
pub const MAX_REQUEST: u32 = 32 << 20;
/// The largest option payload accepted during the handshake.
const MAX_OPTION: u32 = 64 << 10;

/// Errors in replies (errno values of the protocol).
const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// One virtual disk served over NBD. Each call that changes the disk returns an optional
/// ticket: the reply waits until [`Export::wait`] returns for it.
pub trait Export: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `offset`.
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<Option<u64>>;
    /// Zeroes a range; `punch` allows a hole instead of written zeroes.
    fn zero(&self, offset: u64, len: u64, punch: bool, fua: bool) -> io::Result<Option<u64>>;
    /// Discards a range (its content is then undefined; the replica gets a hole).
    fn trim(&self, offset: u64, len: u64) -> io::Result<Option<u64>>;
    /// Everything written so far must become durable.
    fn flush(&self) -> io::Result<Option<u64>>;
    /// No further request is waiting to be read: the moment to close a group of writes.
    fn idle(&self) {}
    /// Waits until `ticket` is done (sync mode: acknowledged by the target).
    fn wait(&self, _ticket: u64) {}
}

/// A request of the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// What to do.
    pub kind: Kind,
    /// The client's cookie, echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte count (of the payload, for writes).
    pub len: u32,
}

/// Request types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_DISC`: the client disconnects.
    Disconnect,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// Anything else (answered with `EINVAL`).
    Other(u16),
}

/// A client that broke the protocol (the connection is closed).
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// A request did not start with the request magic.
    #[error("NBD request with bad magic {0:#x}")]
    BadMagic(u32),
    /// A request or option larger than accepted.
    #[error("NBD {what} of {len} bytes is larger than the {max} accepted")]
    TooLarge {
        /// Request or option.
        what: &'static str,
        /// Its length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The client did not speak fixed newstyle.
    #[error("NBD client does not speak the fixed newstyle handshake (flags {0:#x})")]
    NotFixedNewstyle(u32),
    /// An option header without the option magic.
    #[error("NBD option with bad magic {0:#x}")]
    BadOptionMagic(u64),
}

impl From<ProtocolError> for io::Error {
    fn from(e: ProtocolError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Parses the 28-byte request header.
pub fn parse_request(b: &[u8; 28]) -> Result<Request, ProtocolError> {
    let magic = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
    if magic != REQUEST_MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let flags = u16::from_be_bytes([b[4], b[5]]);
    let kind = match u16::from_be_bytes([b[6], b[7]]) {
        0 => Kind::Read,
        1 => Kind::Write,
        2 => Kind::Disconnect,
        3 => Kind::Flush,
        4 => Kind::Trim,
        6 => Kind::WriteZeroes,
        k => Kind::Other(k),
    };
    let handle = u64::from_be_bytes(b[8..16].try_into().expect("8 bytes"));
    let offset = u64::from_be_bytes(b[16..24].try_into().expect("8 bytes"));
    let len = u32::from_be_bytes(b[24..28].try_into().expect("4 bytes"));
    if len > MAX_REQUEST && matches!(kind, Kind::Read | Kind::Write) {
        return Err(ProtocolError::TooLarge { what: "request", len, max: MAX_REQUEST });
    }
    Ok(Request { flags, kind, handle, offset, len })
}

/// Encodes a simple reply header.
pub fn simple_reply(error: u32, handle: u64) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    r[4..8].copy_from_slice(&error.to_be_bytes());
    r[8..16].copy_from_slice(&handle.to_be_bytes());
    r
}

fn errno_of(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => ENOSPC,
        Some(libc::EPERM) | Some(libc::EACCES) => EPERM,
        Some(libc::EINVAL) => EINVAL,
        _ => EIO,
    }
}

/// Finds exports by name.
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<Arc<dyn Export>>;

/// What the handshake settled.
struct Negotiated {
    export: Arc<dyn Export>,
}

/// Serves one client connection until it disconnects. `names` lists the exports (for
/// `NBD_OPT_LIST`).
pub fn serve(stream: UnixStream, names: &[String], lookup: Lookup<'_>) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(256 << 10, stream.try_clone()?);
    let Some(neg) = handshake(&mut reader, &mut writer, names, lookup)? else {
        return Ok(());
    };
    transmission(reader, writer, neg.export)
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn option_reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(20 + data.len());
    m.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    w.write_all(&m)
}

/// Parses the data of `NBD_OPT_INFO`/`NBD_OPT_GO`: the export name (the information
/// requests that follow are answered with everything this server has anyway).
pub fn parse_go(data: &[u8]) -> Option<String> {
    let n = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4 + n)?;
    let nreq = u16::from_be_bytes(data.get(4 + n..6 + n)?.try_into().ok()?) as usize;
    if data.len() != 6 + n + 2 * nreq {
        return None;
    }
    String::from_utf8(name.to_vec()).ok()
}

fn handshake(
    r: &mut impl Read,
    w: &mut impl Write,
    names: &[String],
    lookup: Lookup<'_>,
) -> io::Result<Option<Negotiated>> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&hello)?;
    let client = read_u32(r)?;
    if client & u32::from(FLAG_FIXED_NEWSTYLE) == 0 {
        return Err(ProtocolError::NotFixedNewstyle(client).into());
    }
    let no_zeroes = client & u32::from(FLAG_NO_ZEROES) != 0;
    loop {
        let magic = read_u64(r)?;
        if magic != IHAVEOPT {
            return Err(ProtocolError::BadOptionMagic(magic).into());
        }
        let opt = read_u32(r)?;
        let len = read_u32(r)?;
        if len > MAX_OPTION {
            return Err(ProtocolError::TooLarge { what: "option", len, max: MAX_OPTION }.into());
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                let Some(export) = String::from_utf8(data).ok().and_then(|n| lookup(&n)) else {
                    return Ok(None); // the protocol's only answer: close
                };
                let mut m = Vec::with_capacity(134);
                m.extend_from_slice(&export.size().to_be_bytes());
                m.extend_from_slice(&TFLAGS.to_be_bytes());
                if !no_zeroes {
                    m.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&m)?;
                return Ok(Some(Negotiated { export }));
            }
            OPT_ABORT => {
                option_reply(w, opt, REP_ACK, &[])?;
                return Ok(None);
            }
            OPT_LIST => {
                for n in names {
                    let mut d = (n.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(n.as_bytes());
                    option_reply(w, opt, REP_SERVER, &d)?;
                }
                option_reply(w, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let Some(name) = parse_go(&data) else {
                    option_reply(w, opt, REP_ERR_INVALID, &[])?;
                    continue;
                };
                let Some(export) = lookup(&name) else {
                    option_reply(w, opt, REP_ERR_UNKNOWN, format!("no export {name:?}").as_bytes())?;
                    continue;
                };
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&export.size().to_be_bytes());
                info.extend_from_slice(&TFLAGS.to_be_bytes());
                option_reply(w, opt, REP_INFO, &info)?;
                let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                for v in [1u32, 4096, MAX_REQUEST] {
                    bs.extend_from_slice(&v.to_be_bytes());
                }
                option_reply(w, opt, REP_INFO, &bs)?;
                option_reply(w, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(Some(Negotiated { export }));
                }
            }
            _ => option_reply(w, opt, REP_ERR_UNSUP, &[])?,
        }
    }
}

/// A reply that may wait for a ticket; sent in arrival order.
struct Pending {
    handle: u64,
    ticket: Option<u64>,
    error: u32,
}

fn transmission(mut r: BufReader<UnixStream>, w: UnixStream, export: Arc<dyn Export>) -> io::Result<()> {
    let w = Arc::new(Mutex::new(w));
    let (tx, rx) = mpsc::channel::<Pending>();
    let replier = {
        let (w, export) = (w.clone(), export.clone());
        std::thread::Builder::new().name("nbd-replies".into()).spawn(move || {
            for Pending { handle, ticket, error } in rx {
                if let Some(t) = ticket {
                    export.wait(t);
                }
                if w.lock().write_all(&simple_reply(error, handle)).is_err() {
                    return;
                }
            }
        })?
    };
    let result = requests(&mut r, &w, &tx, &*export);
    drop(tx);
    let _ = replier.join();
    match result {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(()),
        other => other,
    }
}

fn requests(
    r: &mut BufReader<UnixStream>,
    w: &Mutex<UnixStream>,
    tx: &mpsc::Sender<Pending>,
    export: &dyn Export,
) -> io::Result<()> {
    let size = export.size();
    loop {
        if r.buffer().is_empty() && !readable_now(r.get_ref()) {
            export.idle();
        }
        let mut head = [0u8; 28];
        r.read_exact(&mut head)?;
        let req = parse_request(&head)?;
        let in_range = req.offset.checked_add(u64::from(req.len)).is_some_and(|end| end <= size);
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let done: io::Result<Option<u64>> = match req.kind {
            Kind::Disconnect => return Ok(()),
            Kind::Read => {
                let mut buf = vec![0u8; req.len as usize];
                let res = if in_range { export.read(req.offset, &mut buf) } else { Err(einval()) };
                let mut w = w.lock();
                match res {
                    Ok(()) => {
                        w.write_all(&simple_reply(0, req.handle))?;
                        w.write_all(&buf)?;
                    }
                    Err(e) => w.write_all(&simple_reply(errno_of(&e), req.handle))?,
                }
                continue;
            }
            Kind::Write => {
                let mut data = vec![0u8; req.len as usize];
                r.read_exact(&mut data)?;
                if in_range { export.write(req.offset, data, fua) } else { Err(einval()) }
            }
            Kind::Flush => export.flush(),
            Kind::Trim if in_range => export.trim(req.offset, u64::from(req.len)),
            Kind::WriteZeroes if in_range => {
                let punch = req.flags & CMD_FLAG_NO_HOLE == 0;
                export.zero(req.offset, u64::from(req.len), punch, fua)
            }
            Kind::Trim | Kind::WriteZeroes | Kind::Other(_) => Err(einval()),
        };
        let (ticket, error) = match done {
            Ok(t) => (t, 0),
            Err(e) => {
                tracing::warn!(?req, error = %e, "NBD request failed");
                (None, errno_of(&e))
            }
        };
        match ticket {
            // Nothing to wait for (async mode, errors): answered at once, from this thread,
            // sparing a wake-up of the other per request (replies may come in any order).
            None => w.lock().write_all(&simple_reply(error, req.handle))?,
            Some(_) => {
                if tx.send(Pending { handle: req.handle, ticket, error }).is_err() {
                    return Ok(());
                }
            }
        }
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// Whether a byte can be read without waiting.
fn readable_now(s: &UnixStream) -> bool {
    use rustix::event::{PollFd, PollFlags, poll};
    let mut fds = [PollFd::new(s, PollFlags::IN)];
    poll(&mut fds, Some(&rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 })).is_ok_and(|n| n > 0)
}

#[cfg(test)]
mod tests;
