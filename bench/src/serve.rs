//! `doppel-bench serve-file`: the workload the failover benchmark starts on the replica. A
//! minimal HTTP/1.0 responder answering every request with the current content of one file,
//! so that "the workload answers" needs nothing that may not be installed (no python, no
//! socat), and starts in about a millisecond: what the benchmark times is doppel's failover,
//! not a web server's start-up.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::ServeArgs;

/// Serves until killed.
pub fn main(args: &ServeArgs) -> Result<()> {
    let listener =
        TcpListener::bind(&args.listen).with_context(|| format!("listening on {}", args.listen))?;
    if let Some(p) = &args.pidfile {
        std::fs::write(p, std::process::id().to_string())?;
    }
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        // One client at a time is plenty for a benchmark; a broken one only loses its answer.
        let _ = answer(conn, &args.file);
    }
    Ok(())
}

/// Reads the request head (up to a blank line, 4 KiB or one second) and answers with the file.
fn answer(mut conn: TcpStream, file: &Path) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 4096 {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let reply = match std::fs::read(file) {
        Ok(body) => [
            format!("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n", body.len())
                .into_bytes(),
            body,
        ]
        .concat(),
        Err(e) => format!("HTTP/1.0 503 Service Unavailable\r\n\r\n{e}\n").into_bytes(),
    };
    conn.write_all(&reply)?;
    Ok(())
}

/// Asks `addr` once (`GET /`), giving up if the connection is not accepted within `connect`
/// or the answer does not come within `answer`; returns the body of a 200 answer.
pub fn get(
    addr: &std::net::SocketAddr,
    connect: Duration,
    answer: Duration,
) -> std::io::Result<Option<String>> {
    let mut s = TcpStream::connect_timeout(addr, connect)?;
    s.set_read_timeout(Some(answer))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)?;
    let text = String::from_utf8_lossy(&reply);
    Ok(text
        .strip_prefix("HTTP/1.0 200 OK\r\n")
        .and_then(|rest| rest.split_once("\r\n\r\n"))
        .map(|(_, body)| body.to_string()))
}
