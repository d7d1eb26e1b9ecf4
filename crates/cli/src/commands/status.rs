//! `doppel status` and `doppel verify`: clients of the control sockets.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use serde_json::{Value, json};

use crate::cli::{LimitArgs, StatusArgs, VerifyArgs};
use crate::control;

pub fn run(a: StatusArgs, home: &Path) -> Result<()> {
    let mut jobs: Vec<Value> = Vec::new();
    let mut replicas: Vec<Value> = Vec::new();
    for sock in control::sockets(home) {
        let Ok(answer) = control::request(&sock, &json!({ "cmd": "status" }), Duration::from_secs(5)) else {
            continue;
        };
        if let Some(j) = answer.get("jobs").and_then(Value::as_array) {
            jobs.extend(j.iter().cloned());
        }
        if let Some(r) = answer.get("replicas").and_then(Value::as_array) {
            replicas.extend(r.iter().cloned());
        }
    }
    // Jobs with state on disk but no running agent.
    if let Ok(rd) = std::fs::read_dir(home.join("jobs")) {
        let mut names: Vec<String> =
            rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        for name in names {
            if jobs.iter().any(|j| j["job"] == name.as_str()) {
                continue;
            }
            let acked: u64 = std::fs::read_to_string(home.join("jobs").join(&name).join("spool/acked"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            jobs.push(
                json!({ "job": name, "state": "stopped", "last_acked_seq": acked, "connected": false }),
            );
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json!({ "jobs": jobs, "replicas": replicas }))?);
        return Ok(());
    }
    if jobs.is_empty() && replicas.is_empty() {
        println!("no jobs or replicas under {}", home.display());
        return Ok(());
    }
    if !jobs.is_empty() {
        println!(
            "{:<16} {:<13} {:>10} {:>10} {:>10} {:>8}  DESTINATION",
            "JOB", "STATE", "CAPTURED", "ACKED", "PENDING", "LAG"
        );
        for j in &jobs {
            println!(
                "{:<16} {:<13} {:>10} {:>10} {:>10} {:>8}  {}",
                s(&j["job"]),
                s(&j["state"]),
                n(&j["last_captured_seq"]),
                n(&j["last_acked_seq"]),
                bytes(j["pending_bytes"].as_u64()),
                j["lag_seconds"].as_f64().map(|l| format!("{l:.1}s")).unwrap_or_else(|| "-".into()),
                s(&j["dest"]),
            );
            let mut notes = Vec::new();
            if let Some(c) = j["capture"].as_str().filter(|c| !c.is_empty()) {
                notes.push(format!("capture {c}"));
            }
            match j["sync"].as_str() {
                Some("on") => notes.push("sync".into()),
                Some("degraded") => notes.push("SYNC DEGRADED: fsync no longer waits for the target".into()),
                _ => {}
            }
            if let Some(d) = j["dirty_regions"].as_u64().filter(|d| *d > 0) {
                notes.push(format!("{d} dirty regions"));
            }
            if let Some(r) = j["rate_limit"].as_u64().filter(|r| *r > 0) {
                notes.push(format!("limit {}", doppel_link::ratelimit::format_rate(r)));
            }
            if !notes.is_empty() {
                println!("{:<16} {}", "", notes.join(", "));
            }
            let detail = s(&j["detail"]);
            if !detail.is_empty() && detail != "-" {
                println!("{:<16} {detail}", "");
            }
        }
    }
    if !replicas.is_empty() {
        if !jobs.is_empty() {
            println!();
        }
        println!(
            "{:<16} {:<16} {:<13} {:>10} {:>10} {:>10}  SEEN",
            "SOURCE", "JOB", "STATE", "APPLIED", "DURABLE", "RECEIVED"
        );
        for r in &replicas {
            println!(
                "{:<16} {:<16} {:<13} {:>10} {:>10} {:>10}  {}",
                s(&r["source"]),
                s(&r["job"]),
                s(&r["state"]),
                n(&r["applied"]),
                n(&r["durable"]),
                bytes(r["bytes_received"].as_u64()),
                r["last_seen_secs"].as_u64().map(|t| format!("{t}s ago")).unwrap_or_else(|| "never".into()),
            );
        }
    }
    Ok(())
}

pub fn verify(a: VerifyArgs, home: &Path) -> Result<()> {
    let sock = control::run_dir(home).join(format!("job-{}.sock", a.job));
    if !sock.exists() {
        bail!("job {} is not running here: start it with `doppel protect` first", a.job);
    }
    let answer = control::request(
        &sock,
        &json!({ "cmd": "verify", "repair": a.repair }),
        Duration::from_secs(24 * 3600),
    )?;
    if let Some(e) = answer.get("error").and_then(Value::as_str) {
        bail!("verify failed: {e}");
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        let diffs = answer["differences"].as_array().cloned().unwrap_or_default();
        for d in &diffs {
            println!("{}: {}", s(&d["path"]), s(&d["what"]));
        }
        let compared = answer["entries_compared"].as_u64().unwrap_or(0);
        match (diffs.len(), a.repair) {
            (0, _) => println!("replica matches the source ({compared} entries compared)"),
            (n, true) => {
                println!("{n} differences found and queued for repair ({compared} entries compared)")
            }
            (n, false) => {
                println!("{n} differences found ({compared} entries compared); run with --repair to fix them")
            }
        }
    }
    if !a.repair && answer["differences"].as_array().is_some_and(|d| !d.is_empty()) {
        return Err(anyhow!("replica differs from the source"));
    }
    Ok(())
}

fn s(v: &Value) -> String {
    v.as_str().map(str::to_string).unwrap_or_else(|| "-".into())
}

fn n(v: &Value) -> String {
    v.as_u64().map(|x| x.to_string()).unwrap_or_else(|| "-".into())
}

fn bytes(v: Option<u64>) -> String {
    let Some(b) = v else { return "-".into() };
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = b as f64;
    let mut u = 0;
    while x >= 1024.0 && u < UNITS.len() - 1 {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{b} B") } else { format!("{x:.1} {}", UNITS[u]) }
}

pub fn limit(a: LimitArgs, home: &Path) -> Result<()> {
    let sock = control::run_dir(home).join(format!("job-{}.sock", a.job));
    if !sock.exists() {
        bail!("job {} is not running here: start it with `doppel protect` first", a.job);
    }
    if a.rate != "schedule" {
        doppel_link::ratelimit::parse_rate(&a.rate).map_err(|e| anyhow!(e))?;
    }
    let answer =
        control::request(&sock, &json!({ "cmd": "limit", "rate": a.rate }), Duration::from_secs(10))?;
    if let Some(e) = answer.get("error").and_then(Value::as_str) {
        bail!("{e}");
    }
    let rate = answer["rate_limit"].as_u64().unwrap_or(0);
    println!("{}: bandwidth limit {}", a.job, doppel_link::ratelimit::format_rate(rate));
    Ok(())
}
