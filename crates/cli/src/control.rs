//! The local control socket of a running agent or target.
//!
//! Each running process listens on a Unix socket under `HOME/run/` (mode 0600: whoever can
//! read the node's state may ask). A request is one line of JSON, the answer is one line of
//! JSON. `doppel status` and `doppel verify` are its clients; so can be any monitoring script.

use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Answers one request.
pub type Handler = Arc<dyn Fn(Value) -> Pin<Box<dyn Future<Output = Value> + Send>> + Send + Sync>;

/// `HOME/run`.
pub fn run_dir(home: &Path) -> PathBuf {
    home.join("run")
}

/// Serves `handler` on the socket at `path` until `stop` is cancelled; removes the socket then.
pub async fn serve(path: PathBuf, handler: Handler, stop: CancellationToken) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // A socket left by a killed process is stale if nobody answers on it.
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            anyhow::bail!("another doppel process is already serving {}", path.display());
        }
        let _ = std::fs::remove_file(&path);
    }
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let req: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                let mut answer = serde_json::to_vec(&handler(req).await).unwrap_or_default();
                answer.push(b'\n');
                if w.write_all(&answer).await.is_err() {
                    break;
                }
            }
        });
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Sends one request and waits up to `timeout` for the answer.
pub fn request(path: &Path, req: &Value, timeout: Duration) -> Result<Value> {
    let mut s = std::os::unix::net::UnixStream::connect(path)
        .with_context(|| format!("nothing answers on {}", path.display()))?;
    s.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).with_context(|| format!("no answer on {}", path.display()))?;
    Ok(serde_json::from_str(&answer)?)
}

/// The sockets of running processes under `home`.
pub fn sockets(home: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(run_dir(home))
        .map(|rd| {
            rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "sock")).collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
