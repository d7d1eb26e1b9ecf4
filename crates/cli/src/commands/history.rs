//! `doppel history list` and `doppel history restore`: read a replica's history from its
//! files, whether or not the process applying to it runs (a restore pins what it reads, so
//! retention in a running target leaves it alone).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use doppel_apply::history::restore::{Restored, measure, restore};
use doppel_apply::history::view::{PointView, Summary, summary};
use doppel_apply::history::when::{When, rfc3339, window};
use doppel_apply::history::{attic_of, dir_of};

use crate::cli::{HistoryBookmarkArgs, HistoryCommand, HistoryListArgs, HistoryRestoreArgs, ReplicaArg};
use crate::config::FileConfig;
use crate::progress::{Counts, Progress};

/// Where the target of a home records the data directory it runs with.
pub fn data_note(home: &Path) -> PathBuf {
    home.join("target-data")
}

/// The data directory the target of a home last ran with, if it ever ran.
pub fn noted_data_dir(home: &Path) -> Option<PathBuf> {
    std::fs::read_to_string(data_note(home)).ok().map(|s| PathBuf::from(s.trim()))
}

/// Runs a `doppel history` subcommand.
pub fn run(c: HistoryCommand, file: &FileConfig, home: &Path) -> Result<()> {
    match c {
        HistoryCommand::List(a) => list(a, file, home),
        HistoryCommand::Restore(a) => restore_cmd(a, file, home),
        HistoryCommand::Bookmark(a) => bookmark(a, home),
    }
}

fn bookmark(a: HistoryBookmarkArgs, home: &Path) -> Result<()> {
    doppel_apply::history::when::check_bookmark_name(&a.name)
        .map_err(|e| anyhow!("bookmark {:?}: {e}", a.name))?;
    let sock = super::status::running_job(home, &a.job)?;
    let req = crate::control::ControlRequest::Bookmark { name: a.name.clone() };
    match crate::control::call(&sock, &req, std::time::Duration::from_secs(30))? {
        crate::control::ControlResponse::Bookmarked { seq } => {
            outln!("{}: bookmark {} at seq:{seq}", a.job, a.name)?;
            Ok(())
        }
        crate::control::ControlResponse::Error { message } => bail!("bookmark {}: {message}", a.name),
        other => bail!("unexpected answer to bookmark: {other:?}"),
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
                .or_else(|| noted_data_dir(home))
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
            Place {
                name,
                root: PathBuf::from(state.dest),
                state: dir.join(doppel_agent::agent::EMBEDDED_STATE),
            }
        }
    };
    if !place.state.join("checkpoint.json").exists() {
        bail!("unknown replica {} (no replica state in {})", place.name, place.state.display());
    }
    Ok(place)
}

fn resolve(w: &When, s: &Summary) -> Result<u64> {
    Ok(w.resolve(s)?)
}

fn parse_when(s: &str, now_us: u64) -> Result<When> {
    Ok(When::parse(s, now_us)?)
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
                "oldest": pt(o, s.oldest.map_or(0, |o| o.1)),
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
        outln!("{}", serde_json::to_string_pretty(&out)?)?;
        return Ok(());
    }
    outln!("{}: {}", p.name, window(&s))?;
    outln!("history on disk: {}", doppel_apply::quota::iec(s.bytes))?;
    for pt in points {
        let name = match &pt.mark {
            doppel_apply::history::record::Mark::Bookmark(n) => format!(" {n}"),
            _ => String::new(),
        };
        outln!("  seq:{:<10} {}  {}{name}", pt.seq, rfc3339(pt.time_us), pt.mark.kind())?;
    }
    outln!("({NOTE})")?;
    Ok(())
}

fn restore_cmd(a: HistoryRestoreArgs, file: &FileConfig, home: &Path) -> Result<()> {
    let p = place(&a.replica, file, home)?;
    let to = doppel_fs::beneath::canonical_to_be(&a.to).with_context(|| a.to.display().to_string())?;
    for (inside, what) in [(&p.root, "the replica"), (&p.state, "the replica's state and history")] {
        let inside = std::fs::canonicalize(inside).unwrap_or_else(|_| inside.clone());
        if to.starts_with(&inside) {
            bail!(
                "{} is inside {what} ({}): a restore writes a copy elsewhere (to bring the replica itself back to a point, fail over to it)",
                a.to.display(),
                inside.display()
            );
        }
    }
    let created = prepare_dest(&a.to)?;
    let result = (|| -> Result<Restored> {
        let s = p.summary()?;
        let point = resolve(&parse_when(&a.at, now_us())?, &s)?;
        let newest = s.newest.map_or(0, |n| n.0);
        let mut view = PointView::open(&p.root, &p.history(), point, newest)?;
        let paths: Vec<Vec<u8>> = a.paths.iter().map(|p| p.trim_matches('/').as_bytes().to_vec()).collect();
        let context = || format!("restoring {} at seq:{point} into {}", p.name, a.to.display());
        let mut bar = Progress::new("restore", "objects");
        let total = measure(&mut view, &paths).with_context(context)?;
        bar.set_total(Some(Counts::new(total.objects, total.read)));
        let mut progress = |r: Restored| bar.update(Counts::new(r.objects, r.read));
        let done = restore(&mut view, &paths, &a.to, &mut progress).with_context(context)?;
        drop(bar);
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
