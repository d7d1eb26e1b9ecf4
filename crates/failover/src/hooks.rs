//! The operator's scripts, and the addresses a failover takes over.
//!
//! Scripts run through `/bin/sh -c` with the failover's context in the environment
//! (`DOPPEL_SOURCE`, `DOPPEL_STEP`, `DOPPEL_JOBS`, `DOPPEL_DATA`, and for per-job scripts
//! `DOPPEL_JOB`, `DOPPEL_REPLICA`, `DOPPEL_EPOCH`; the notify command gets `DOPPEL_SOURCE`,
//! `DOPPEL_EVENT`, `DOPPEL_DETAIL`), so one script can serve every job. Their output goes to the target's log
//! line by line and its tail into the error when they fail: the operator sees why at once.
//! Address changes go through `ip(8)` and are idempotent (an address already there is left
//! alone), so a rerun of a failover that stopped half way does no harm.

use std::collections::VecDeque;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

/// Why a script or an address change failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The script could not be started.
    #[error("cannot run `{script}`: {source}")]
    Spawn {
        /// The script.
        script: String,
        /// Why.
        source: std::io::Error,
    },
    /// The script exited unsuccessfully.
    #[error("`{script}` failed ({status}){}", tail_text(.tail))]
    Failed {
        /// The script.
        script: String,
        /// How it ended.
        status: String,
        /// Its last lines of output.
        tail: Vec<String>,
    },
    /// The script ran past its time limit and was killed.
    #[error("`{script}` did not finish within {limit:?} and was killed{}", tail_text(.tail))]
    Timeout {
        /// The script.
        script: String,
        /// The limit.
        limit: Duration,
        /// Its last lines of output.
        tail: Vec<String>,
    },
}

fn tail_text(tail: &[String]) -> String {
    if tail.is_empty() { String::new() } else { format!(":\n    {}", tail.join("\n    ")) }
}

/// Lines of output kept for an error.
const TAIL: usize = 15;

/// Runs `script` with `env`, waiting at most `limit`.
pub async fn run_script(script: &str, env: &[(String, String)], limit: Duration) -> Result<(), HookError> {
    let mut child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| HookError::Spawn { script: script.to_string(), source })?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    for out in [
        child.stdout.take().map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        child.stderr.take().map(|e| Box::new(e) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut tail = VecDeque::with_capacity(TAIL);
    let mut keep = |l: String| {
        tracing::info!(script, "| {l}");
        if tail.len() == TAIL {
            tail.pop_front();
        }
        tail.push_back(l);
    };
    let deadline = tokio::time::Instant::now() + limit;
    let mut open = true;
    // Ends with the script, not with its output: a daemon it started may keep the pipes open.
    let status = loop {
        tokio::select! {
            l = rx.recv(), if open => match l {
                Some(l) => keep(l),
                None => open = false,
            },
            s = child.wait() => break Some(s),
            _ = tokio::time::sleep_until(deadline) => break None,
        }
    };
    // Output written just before the exit.
    let grace = tokio::time::Instant::now() + Duration::from_millis(200);
    while let Ok(Some(l)) = tokio::time::timeout_at(grace, rx.recv()).await {
        keep(l);
    }
    let tail: Vec<String> = tail.into_iter().collect();
    match status {
        None => {
            let _ = child.kill().await;
            Err(HookError::Timeout { script: script.to_string(), limit, tail })
        }
        Some(Err(source)) => Err(HookError::Spawn { script: script.to_string(), source }),
        Some(Ok(s)) if s.success() => Ok(()),
        Some(Ok(s)) => Err(HookError::Failed { script: script.to_string(), status: s.to_string(), tail }),
    }
}

/// Adds `addr` (`10.0.0.5/24`) to `iface` unless it is already there, then announces it with
/// gratuitous ARP when `arping` is installed (IPv4 only; IPv6 announces itself).
pub async fn take_address(addr: &str, iface: &str, limit: Duration) -> Result<bool, HookError> {
    if has_address(addr, iface, limit).await? {
        return Ok(false);
    }
    run_script(&format!("ip addr add {} dev {}", shell_quote(addr), shell_quote(iface)), &[], limit).await?;
    let ip = addr.split('/').next().unwrap_or(addr);
    if !ip.contains(':') && which("arping") {
        // Best effort, in the background: the announcements go out over a few seconds while the
        // workload starts; neighbours that miss them learn the new place within their ARP
        // timeout.
        let cmd = format!("arping -U -c 3 -w 3 -I {} {}", shell_quote(iface), shell_quote(ip));
        tokio::spawn(async move {
            if let Err(e) = run_script(&cmd, &[], Duration::from_secs(10)).await {
                tracing::warn!(error = %e, "gratuitous ARP failed");
            }
        });
    }
    Ok(true)
}

/// Removes `addr` from `iface` if it is there.
pub async fn release_address(addr: &str, iface: &str, limit: Duration) -> Result<bool, HookError> {
    if !has_address(addr, iface, limit).await? {
        return Ok(false);
    }
    run_script(&format!("ip addr del {} dev {}", shell_quote(addr), shell_quote(iface)), &[], limit).await?;
    Ok(true)
}

async fn has_address(addr: &str, iface: &str, limit: Duration) -> Result<bool, HookError> {
    let out = tokio::time::timeout(
        limit,
        tokio::process::Command::new("ip").args(["-o", "addr", "show", "dev", iface]).output(),
    )
    .await
    .map_err(|_| HookError::Timeout { script: format!("ip addr show dev {iface}"), limit, tail: Vec::new() })?
    .map_err(|source| HookError::Spawn { script: "ip".into(), source })?;
    if !out.status.success() {
        return Err(HookError::Failed {
            script: format!("ip addr show dev {iface}"),
            status: out.status.to_string(),
            tail: String::from_utf8_lossy(&out.stderr).lines().map(str::to_string).collect(),
        });
    }
    // `ip` prints addresses with their prefix; without one, any prefix matches.
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .any(|w| w == addr || (!addr.contains('/') && w.split('/').next() == Some(addr))))
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| Path::new(&d).join(tool).is_file()))
        .unwrap_or(false)
}

/// Quotes `s` for `/bin/sh`.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:=@%+,".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn scripts_see_their_environment_and_failures_say_why() {
        let env = vec![("DOPPEL_JOB".to_string(), "www".to_string())];
        run_script("test \"$DOPPEL_JOB\" = www", &env, Duration::from_secs(10)).await.unwrap();
        let e = run_script("echo starting; echo 'no such VM' >&2; exit 3", &env, Duration::from_secs(10))
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(text.contains("exit status: 3"), "{text}");
        assert!(text.contains("no such VM") && text.contains("starting"), "{text}");
        let e = run_script("echo slow; sleep 30", &env, Duration::from_millis(300)).await.unwrap_err();
        assert!(matches!(e, HookError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("slow"), "{e}");
        // A daemon started in the background keeps the output pipes open; the script is done
        // when it exits all the same.
        let started = std::time::Instant::now();
        run_script("sleep 5 & echo started", &env, Duration::from_secs(30)).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(3), "waited for the daemon: {:?}", started.elapsed());
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("10.0.0.5/24"), "10.0.0.5/24");
        assert_eq!(shell_quote("a b'c"), r"'a b'\''c'");
    }
}
