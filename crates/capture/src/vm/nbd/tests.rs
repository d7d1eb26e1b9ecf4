//! The NBD server, tested as a client sees it: bytes on a socket pair.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use parking_lot::Mutex;

use super::*;

/// An in-memory disk that records what was asked of it.
#[derive(Default)]
struct Memory {
    bytes: Mutex<Vec<u8>>,
    calls: Mutex<Vec<String>>,
    ticket: Option<u64>,
    waited: Mutex<Vec<u64>>,
}

impl Export for Memory {
    fn size(&self) -> u64 {
        self.bytes.lock().len() as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let b = self.bytes.lock();
        buf.copy_from_slice(&b[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<Option<u64>> {
        self.calls.lock().push(format!("write {offset} {} fua={fua}", data.len()));
        self.bytes.lock()[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        Ok(self.ticket)
    }
    fn zero(&self, offset: u64, len: u64, punch: bool, _fua: bool) -> io::Result<Option<u64>> {
        self.calls.lock().push(format!("zero {offset} {len} punch={punch}"));
        Ok(None)
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<Option<u64>> {
        self.calls.lock().push(format!("trim {offset} {len}"));
        Ok(None)
    }
    fn flush(&self) -> io::Result<Option<u64>> {
        self.calls.lock().push("flush".into());
        Err(io::Error::from_raw_os_error(libc::ENOSPC))
    }
    fn wait(&self, ticket: u64) {
        self.waited.lock().push(ticket);
    }
}

fn start(mem: Arc<Memory>) -> (UnixStream, std::thread::JoinHandle<io::Result<()>>) {
    let (client, server) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let names = vec!["disk0".to_string()];
        let lookup = |n: &str| (n == "disk0").then(|| mem.clone() as Arc<dyn Export>);
        serve(server, &names, &lookup)
    });
    (client, t)
}

fn option(c: &mut UnixStream, opt: u32, data: &[u8]) {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    c.write_all(&m).unwrap();
}

/// Reads one option reply: (option, type, data).
fn option_reply(c: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    c.read_exact(&mut h).unwrap();
    assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), REPLY_MAGIC);
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut d = vec![0u8; len];
    c.read_exact(&mut d).unwrap();
    (u32::from_be_bytes(h[8..12].try_into().unwrap()), u32::from_be_bytes(h[12..16].try_into().unwrap()), d)
}

fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d
}

/// Greeting, client flags, then `NBD_OPT_GO` on `disk0`; returns the size announced.
fn negotiate(c: &mut UnixStream) -> u64 {
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[0..8], b"NBDMAGIC");
    c.write_all(&u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes()).unwrap();
    option(c, 8, &[]); // structured replies: not offered
    assert_eq!(option_reply(c).1, REP_ERR_UNSUP);
    option(c, OPT_GO, &go_data("nope"));
    assert_eq!(option_reply(c).1, REP_ERR_UNKNOWN);
    option(c, OPT_GO, &go_data("disk0"));
    let (opt, kind, info) = option_reply(c);
    assert_eq!((opt, kind), (OPT_GO, REP_INFO));
    assert_eq!(u16::from_be_bytes([info[0], info[1]]), INFO_EXPORT);
    let size = u64::from_be_bytes(info[2..10].try_into().unwrap());
    assert_eq!(u16::from_be_bytes([info[10], info[11]]), TFLAGS);
    assert_eq!(option_reply(c).1, REP_INFO); // block sizes
    assert_eq!(option_reply(c).1, REP_ACK);
    size
}

fn request(c: &mut UnixStream, kind: u16, flags: u16, handle: u64, offset: u64, len: u32, data: &[u8]) {
    let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&handle.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(data);
    c.write_all(&m).unwrap();
}

/// Reads a simple reply: (error, handle).
fn reply(c: &mut UnixStream) -> (u32, u64) {
    let mut r = [0u8; 16];
    c.read_exact(&mut r).unwrap();
    assert_eq!(u32::from_be_bytes(r[0..4].try_into().unwrap()), SIMPLE_REPLY_MAGIC);
    (u32::from_be_bytes(r[4..8].try_into().unwrap()), u64::from_be_bytes(r[8..16].try_into().unwrap()))
}

#[test]
fn a_client_negotiates_writes_reads_back_and_disconnects() {
    let mem =
        Arc::new(Memory { bytes: Mutex::new(vec![0u8; 1 << 20]), ticket: Some(7), ..Memory::default() });
    let (mut c, t) = start(mem.clone());
    assert_eq!(negotiate(&mut c), 1 << 20);
    request(&mut c, 1, CMD_FLAG_FUA, 11, 4096, 5, b"hello");
    assert_eq!(reply(&mut c), (0, 11));
    request(&mut c, 0, 0, 12, 4094, 8, &[]);
    assert_eq!(reply(&mut c), (0, 12));
    let mut data = [0u8; 8];
    c.read_exact(&mut data).unwrap();
    assert_eq!(&data, b"\0\0hello\0");
    request(&mut c, 6, 0, 13, 0, 65536, &[]);
    assert_eq!(reply(&mut c), (0, 13));
    request(&mut c, 6, CMD_FLAG_NO_HOLE, 14, 0, 512, &[]);
    assert_eq!(reply(&mut c), (0, 14));
    request(&mut c, 4, 0, 15, 8192, 4096, &[]);
    assert_eq!(reply(&mut c), (0, 15));
    request(&mut c, 3, 0, 16, 0, 0, &[]);
    assert_eq!(reply(&mut c), (ENOSPC, 16), "an export's error reaches the client as its errno");
    request(&mut c, 2, 0, 17, 0, 0, &[]);
    t.join().unwrap().unwrap();
    assert_eq!(
        *mem.calls.lock(),
        [
            "write 4096 5 fua=true",
            "zero 0 65536 punch=true",
            "zero 0 512 punch=false",
            "trim 8192 4096",
            "flush"
        ]
    );
    assert_eq!(*mem.waited.lock(), [7], "the write's reply waited for its ticket");
}

#[test]
fn requests_beyond_the_end_are_refused_and_nothing_is_written() {
    let mem = Arc::new(Memory { bytes: Mutex::new(vec![0u8; 4096]), ..Memory::default() });
    let (mut c, t) = start(mem.clone());
    negotiate(&mut c);
    request(&mut c, 1, 0, 1, 4090, 10, &[1u8; 10]);
    assert_eq!(reply(&mut c), (EINVAL, 1));
    request(&mut c, 0, 0, 2, u64::MAX - 2, 10, &[]);
    assert_eq!(reply(&mut c), (EINVAL, 2));
    request(&mut c, 4, 0, 3, 4000, 1000, &[]);
    assert_eq!(reply(&mut c), (EINVAL, 3));
    request(&mut c, 99, 0, 4, 0, 0, &[]);
    assert_eq!(reply(&mut c), (EINVAL, 4), "an unknown command is refused, the connection goes on");
    drop(c);
    t.join().unwrap().unwrap();
    assert!(mem.calls.lock().is_empty());
    assert!(mem.bytes.lock().iter().all(|b| *b == 0));
}

#[test]
fn a_malformed_request_ends_the_connection_with_a_clear_error() {
    let mem = Arc::new(Memory { bytes: Mutex::new(vec![0u8; 4096]), ..Memory::default() });
    let (mut c, t) = start(mem.clone());
    negotiate(&mut c);
    c.write_all(&[0xAB; 28]).unwrap();
    let e = t.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("bad magic 0xabababab"), "{e}");
    let (mut c, t) = start(mem.clone());
    negotiate(&mut c);
    request(&mut c, 1, 0, 1, 0, MAX_REQUEST + 1, &[]);
    let e = t.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("larger than"), "{e}");
    assert!(mem.calls.lock().is_empty());
}

#[test]
fn the_old_export_name_option_and_listing_work_and_an_unknown_name_closes() {
    let mem = Arc::new(Memory { bytes: Mutex::new(vec![0u8; 512]), ..Memory::default() });
    let (mut c, t) = start(mem.clone());
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).unwrap();
    c.write_all(&1u32.to_be_bytes()).unwrap(); // fixed newstyle, zeroes wanted
    option(&mut c, OPT_LIST, &[]);
    let (_, kind, d) = option_reply(&mut c);
    assert_eq!(kind, REP_SERVER);
    assert_eq!(&d[4..], b"disk0");
    assert_eq!(option_reply(&mut c).1, REP_ACK);
    option(&mut c, OPT_EXPORT_NAME, b"disk0");
    let mut m = [0u8; 8 + 2 + 124];
    c.read_exact(&mut m).unwrap();
    assert_eq!(u64::from_be_bytes(m[0..8].try_into().unwrap()), 512);
    request(&mut c, 2, 0, 1, 0, 0, &[]);
    t.join().unwrap().unwrap();

    let (mut c, t) = start(mem);
    c.read_exact(&mut hello).unwrap();
    c.write_all(&3u32.to_be_bytes()).unwrap();
    option(&mut c, OPT_EXPORT_NAME, b"other");
    t.join().unwrap().unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "an unknown export name gets the connection closed, nothing else");
}

#[test]
fn a_client_without_fixed_newstyle_is_refused() {
    let mem = Arc::new(Memory::default());
    let (mut c, t) = start(mem);
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).unwrap();
    c.write_all(&0u32.to_be_bytes()).unwrap();
    let e = t.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("fixed newstyle"), "{e}");
}

#[test]
fn go_data_is_parsed_strictly() {
    assert_eq!(parse_go(&go_data("disk0")).as_deref(), Some("disk0"));
    let mut d = go_data("disk0");
    d.push(0);
    assert_eq!(parse_go(&d), None, "trailing bytes");
    assert_eq!(parse_go(&[0, 0, 0, 9, b'a']), None, "a name longer than the data");
}
