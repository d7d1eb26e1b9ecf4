//! A TCP proxy whose link can be cut and restored, for tests of link failures.
//!
//! Cutting shuts down every connection going through it and refuses new ones (accepted, then
//! closed at once, as a dead route would); restoring lets new connections through again.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use parking_lot::Mutex;

struct Inner {
    upstream: String,
    cut: AtomicBool,
    stop: AtomicBool,
    live: Mutex<Vec<TcpStream>>,
    /// Bytes forwarded towards the upstream.
    up_bytes: AtomicU64,
}

/// A running proxy.
pub struct Proxy {
    addr: String,
    inner: Arc<Inner>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on 127.0.0.1 (any port) and forwards to `upstream`.
    pub fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let inner = Arc::new(Inner {
            upstream: upstream.to_string(),
            cut: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            live: Mutex::new(Vec::new()),
            up_bytes: AtomicU64::new(0),
        });
        let i = inner.clone();
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if i.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(down) = conn else { continue };
                if i.cut.load(Ordering::SeqCst) {
                    let _ = down.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(up) = TcpStream::connect(&i.upstream) else {
                    let _ = down.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = down.set_nodelay(true);
                let _ = up.set_nodelay(true);
                {
                    let mut live = i.live.lock();
                    live.push(down.try_clone().expect("clone"));
                    live.push(up.try_clone().expect("clone"));
                }
                let (d2, u2) = (down.try_clone().expect("clone"), up.try_clone().expect("clone"));
                let counter = i.clone();
                std::thread::spawn(move || pump(down, up, Some(&counter.up_bytes)));
                std::thread::spawn(move || pump(u2, d2, None));
            }
        });
        Proxy { addr, inner, accept: Some(accept) }
    }

    /// `HOST:PORT` to connect to instead of the upstream.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Breaks every connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.inner.cut.store(true, Ordering::SeqCst);
        for s in self.inner.live.lock().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Lets new connections through again.
    pub fn restore(&self) {
        self.inner.cut.store(false, Ordering::SeqCst);
    }

    /// Bytes forwarded from clients to the upstream so far.
    pub fn bytes_up(&self) -> u64 {
        self.inner.up_bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.cut();
        let _ = TcpStream::connect(&self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, count: Option<&AtomicU64>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                if let Some(c) = count {
                    c.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
