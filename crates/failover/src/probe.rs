//! Probes: ways to tell a source is alive besides its replication link.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::policy::Probe;

/// How long one probe may take.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Whether `p` says the source is alive.
pub async fn alive(p: &Probe) -> bool {
    match p {
        Probe::Tcp(addr) => {
            matches!(tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(addr)).await, Ok(Ok(_)))
        }
        Probe::Http(url) => http_ok(url).await.unwrap_or(false),
        Probe::Command(cmd) => {
            let run = tokio::process::Command::new("/bin/sh").arg("-c").arg(cmd).kill_on_drop(true).status();
            matches!(tokio::time::timeout(TIMEOUT, run).await, Ok(Ok(s)) if s.success())
        }
    }
}

/// A plain-HTTP GET: 2xx and 3xx count as alive.
async fn http_ok(url: &str) -> Option<bool> {
    let rest = url.strip_prefix("http://")?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if hostport.contains(':') { hostport.to_string() } else { format!("{hostport}:80") };
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(&addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {hostport}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut head = vec![0u8; 64];
        let n = s.read(&mut head).await.ok()?;
        let line = String::from_utf8_lossy(&head[..n]).into_owned();
        let code: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some((200..400).contains(&code))
    };
    tokio::time::timeout(TIMEOUT, exchange).await.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probes_tell_alive_from_dead() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.0 204 No Content\r\n\r\n").await;
            }
        });
        assert!(alive(&Probe::Tcp(addr.clone())).await);
        assert!(alive(&Probe::Http(format!("http://{addr}/health"))).await);
        assert!(alive(&Probe::Command("true".into())).await);
        assert!(!alive(&Probe::Command("exit 3".into())).await);
        assert!(!alive(&Probe::Tcp("127.0.0.1:1".into())).await);
        assert!(!alive(&Probe::Http("http://127.0.0.1:1/".into())).await);
    }
}
