//! `doppel history list` and `doppel history restore`: read a replica's history from its
//! files, whether or not the process applying to it runs (a restore pins what it reads, so
//! retention in a running target leaves it alone).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use doppel_apply::history::restore::{Restored, restore};
use doppel_apply::history::view::{PointView, Summary, summary};
use doppel_apply::history::{attic_of, dir_of};

use crate::cli::{HistoryCommand, HistoryListArgs, HistoryRestoreArgs, ReplicaArg};
use crate::config::FileConfig;

/// Where the target of a home records the data directory it runs with.
pub fn data_note(home: &Path) -> PathBuf {
    home.join("target-data")
}

/// Runs a `doppel history` subcommand.
pub fn run(c: HistoryCommand, file: &FileConfig, home: &Path) -> Result<()> {
    match c {
        HistoryCommand::List(a) => list(a, file, home),
        HistoryCommand::Restore(a) => restore_cmd(a, file, home),
    }
}

/// A replica's tree and state directory.
struct Place {
    name: String,
    root: PathBuf,
    state: PathBuf,
}

impl Place {
    fn history(&self) -> PathBuf {
        dir_of(&self.state)
    }

    fn summary(&self) -> Result<Summary> {
        summary(&self.history(), &attic_of(&self.root, &self.state))
            .with_context(|| format!("reading the history of {}", self.name))
    }
}

fn place(r: &ReplicaArg, file: &FileConfig, home: &Path) -> Result<Place> {
    let name = r.replica.clone();
    let place = match r.replica.split_once('/') {
        Some((source, job)) => {
            let data = r
                .data
                .clone()
                .or_else(|| file.target.as_ref().and_then(|t| t.data.clone()))
                .or_else(|| std::fs::read_to_string(data_note(home)).ok().map(|s| PathBuf::from(s.trim())))
                .ok_or_else(|| anyhow!("no target data directory: give --data DIR (or [target] data)"))?;
            Place {
                name,
                root: data.join("replicas").join(source).join(job),
                state: data.join("state").join(source).join(job),
            }
        }
        None => {
            let dir = doppel_agent::agent::job_dir(home, &r.replica);
            if !dir.join("state.json").exists() {
                bail!(
                    "unknown replica {name}: no job {name} in {} (a target's replica is SOURCE/JOB)",
                    home.display()
                );
            }
            let state = doppel_agent::state::JobState::load(&dir.join("state.json"))?;
            if !state.dest.starts_with('/') {
                bail!(
                    "job {} replicates to {}, not to a local directory: name its replica as SOURCE/JOB on that target",
                    r.replica,
                    state.dest
                );
            }
            Place { name, root: PathBuf::from(state.dest), state: dir.join("embedded-target") }
        }
    };
    if !place.state.join("checkpoint.json").exists() {
        bail!("unknown replica {} (no replica state in {})", place.name, place.state.display());
    }
    Ok(place)
}

/// A point, as `--at`, `--since` and `--until` give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum When {
    /// The newest point.
    Now,
    /// A moment (µs since the epoch).
    Time(u64),
    /// `seq:N`.
    Seq(u64),
    /// A bookmark's name.
    Bookmark(String),
}

/// Parses WHEN (`now_us` for relative times).
pub fn parse_when(s: &str, now_us: u64) -> Result<When> {
    if s == "now" {
        return Ok(When::Now);
    }
    if let Some(n) = s.strip_prefix("seq:") {
        return Ok(When::Seq(n.parse().map_err(|_| anyhow!("bad point {s:?}: seq:N needs a number"))?));
    }
    if let Some(ago) = s.strip_prefix('-') {
        let secs = crate::config::parse_duration(ago).map_err(|e| anyhow!("bad point {s:?}: {e}"))?;
        return Ok(When::Time(now_us.saturating_sub(secs.as_micros() as u64)));
    }
    if s.starts_with(|c: char| c.is_ascii_digit()) {
        let t: jiff::Timestamp =
            s.parse().map_err(|e| anyhow!("bad point {s:?}: not an RFC 3339 time with its offset ({e})"))?;
        return Ok(When::Time(u64::try_from(t.as_microsecond()).unwrap_or(0)));
    }
    check_bookmark_name(s).map_err(|e| anyhow!("bad point {s:?}: {e}"))?;
    Ok(When::Bookmark(s.to_string()))
}

/// Bookmark names: `[A-Za-z0-9._-]`, not starting with `-` or a digit, not `now`.
pub fn check_bookmark_name(s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s != "now"
        && !s.starts_with(|c: char| c == '-' || c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !ok {
        bail!(
            "a bookmark name is letters, digits, '.', '_' and '-', not starting with '-' or a digit, and not \"now\""
        );
    }
    Ok(())
}

fn rfc3339(us: u64) -> String {
    jiff::Timestamp::from_microsecond(us as i64).map(|t| t.to_string()).unwrap_or_else(|_| us.to_string())
}

fn window(s: &Summary) -> String {
    match (s.oldest, s.newest) {
        (Some((o, _)), Some((n, nt))) => {
            let ot = s.times.first().map_or(0, |t| t.1);
            format!("points {o} (before {}) to {n} ({})", rfc3339(ot), rfc3339(nt))
        }
        _ => "no history yet".into(),
    }
}

/// The point WHEN names in `s`.
fn resolve(w: &When, s: &Summary) -> Result<u64> {
    let newest = s.newest.map_or(0, |n| n.0);
    match w {
        When::Now => Ok(newest),
        When::Seq(n) => {
            let oldest = s.oldest.map_or(newest, |o| o.0);
            if *n < oldest || *n > newest {
                bail!("seq:{n} is outside the history held ({})", window(s));
            }
            Ok(*n)
        }
        When::Time(t) => s
            .point_at(*t)
            .ok_or_else(|| anyhow!("{} is before the history held ({})", rfc3339(*t), window(s))),
        When::Bookmark(b) => s
            .points
            .iter()
            .rev()
            .find(|p| matches!(&p.mark, doppel_apply::history::record::Mark::Bookmark(n) if n == b))
            .map(|p| p.seq)
            .ok_or_else(|| anyhow!("no bookmark {b:?} in the history held ({})", window(s))),
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

fn list(a: HistoryListArgs, file: &FileConfig, home: &Path) -> Result<()> {
    let p = place(&a.replica, file, home)?;
    let s = p.summary()?;
    let bound = |w: &Option<String>| -> Result<Option<u64>> {
        w.as_deref().map(|w| resolve(&parse_when(w, now_us())?, &s)).transpose()
    };
    let (since, until) = (bound(&a.since)?, bound(&a.until)?);
    let mut points: Vec<_> = s
        .points
        .iter()
        .filter(|pt| since.is_none_or(|x| pt.seq >= x) && until.is_none_or(|x| pt.seq <= x))
        .collect();
    if let Some(n) = a.limit {
        points.drain(..points.len().saturating_sub(n));
    }
    const NOTE: &str = "every op boundary is a point; listed are fsync, bookmark and resync points. In watch mode each file is consistent at every point, but order across files is not promised.";
    if a.json {
        let pt = |seq: u64, t: u64| serde_json::json!({"seq": seq, "time": rfc3339(t)});
        let window = match (s.oldest, s.newest) {
            (Some((o, _)), Some((n, nt))) => serde_json::json!({
                "oldest": pt(o, s.times.first().map_or(0, |t| t.1)),
                "newest": pt(n, nt),
            }),
            _ => serde_json::Value::Null,
        };
        let points: Vec<_> = points
            .iter()
            .map(|p| {
                let mut v =
                    serde_json::json!({"seq": p.seq, "time": rfc3339(p.time_us), "kind": p.mark.kind()});
                if let doppel_apply::history::record::Mark::Bookmark(n) = &p.mark {
                    v["name"] = n.clone().into();
                }
                v
            })
            .collect();
        let out = serde_json::json!({
            "replica": p.name, "window": window, "points": points, "bytes": s.bytes, "sets": s.sets, "note": NOTE,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{}: {}", p.name, window(&s));
    println!("history on disk: {}", doppel_apply::quota::iec(s.bytes));
    for pt in points {
        let name = match &pt.mark {
            doppel_apply::history::record::Mark::Bookmark(n) => format!(" {n}"),
            _ => String::new(),
        };
        println!("  seq:{:<10} {}  {}{name}", pt.seq, rfc3339(pt.time_us), pt.mark.kind());
    }
    println!("({NOTE})");
    Ok(())
}

fn restore_cmd(a: HistoryRestoreArgs, file: &FileConfig, home: &Path) -> Result<()> {
    let p = place(&a.replica, file, home)?;
    let created = prepare_dest(&a.to)?;
    let result = (|| -> Result<Restored> {
        let s = p.summary()?;
        let point = resolve(&parse_when(&a.at, now_us())?, &s)?;
        let newest = s.newest.map_or(0, |n| n.0);
        let mut view = PointView::open(&p.root, &p.history(), point, newest)?;
        let paths: Vec<Vec<u8>> = a.paths.iter().map(|p| p.trim_matches('/').as_bytes().to_vec()).collect();
        let tty = std::io::stderr().is_terminal();
        let mut last = std::time::Instant::now();
        let mut progress = |r: Restored| {
            if tty && last.elapsed() >= std::time::Duration::from_millis(200) {
                last = std::time::Instant::now();
                eprint!("\r{} objects, {} restored", r.objects, doppel_apply::quota::iec(r.bytes));
            }
        };
        let done = restore(&mut view, &paths, &a.to, &mut progress)
            .with_context(|| format!("restoring {} at seq:{point} into {}", p.name, a.to.display()))?;
        if tty {
            eprintln!();
        }
        eprintln!(
            "restored {} at seq:{point} ({}) into {}: {} objects, {}",
            p.name,
            s.time_of(point).map_or_else(|| "before the first op held".into(), rfc3339),
            a.to.display(),
            done.objects,
            doppel_apply::quota::iec(done.bytes)
        );
        Ok(done)
    })();
    if let Err(e) = result {
        remove_partial(&a.to, created);
        return Err(e);
    }
    Ok(())
}

/// Makes sure `to` is a new or empty directory; whether it was created here.
fn prepare_dest(to: &Path) -> Result<bool> {
    match std::fs::read_dir(to) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                bail!("{} is not empty: restore into a new or empty directory", to.display());
            }
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
            Ok(true)
        }
        Err(e) => Err(anyhow!("{}: {e}", to.display())),
    }
}

/// Removes what a failed restore wrote.
fn remove_partial(to: &Path, created: bool) {
    if created {
        let _ = std::fs::remove_dir_all(to);
        return;
    }
    if let Ok(rd) = std::fs::read_dir(to) {
        for e in rd.flatten() {
            let p = e.path();
            let _ = if p.is_dir() && !p.is_symlink() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_parses_every_form_and_refuses_the_rest_saying_why() {
        let now = 10_000_000_000;
        assert_eq!(parse_when("now", now).unwrap(), When::Now);
        assert_eq!(parse_when("seq:42", now).unwrap(), When::Seq(42));
        assert_eq!(parse_when("-15m", now).unwrap(), When::Time(now - 900_000_000));
        assert_eq!(parse_when("-2h", now).unwrap(), When::Time(now - 7_200_000_000));
        assert_eq!(
            parse_when("2026-12-04T17:05:00Z", now).unwrap(),
            parse_when("2026-12-04T18:05:00+01:00", now).unwrap()
        );
        assert_eq!(parse_when("before-upgrade", now).unwrap(), When::Bookmark("before-upgrade".into()));
        for bad in ["seq:x", "2026-12-04T17:05:00", "-5 parsecs", "a b", "9lives"] {
            assert!(parse_when(bad, now).is_err(), "{bad}");
        }
        assert!(check_bookmark_name("now").is_err());
        assert!(check_bookmark_name("-x").is_err());
    }
}
