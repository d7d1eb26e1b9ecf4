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
    let mut sources: Vec<Value> = Vec::new();
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
        if let Some(r) = answer.get("sources").and_then(Value::as_array) {
            sources.extend(r.iter().cloned());
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
            let state: Value = std::fs::read(home.join("jobs").join(&name).join("state.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(Value::Null);
            let mut row =
                json!({ "job": name, "state": "stopped", "last_acked_seq": acked, "connected": false });
            if let Some(epoch) = state["fenced"].as_u64() {
                row["state"] = json!("fenced");
                row["detail"] = json!(format!(
                    "the target failed this job over (epoch {epoch}) and refuses it: run `doppel protect --failback` to take the workload back"
                ));
            }
            jobs.push(row);
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "jobs": jobs, "replicas": replicas, "sources": sources }))?
        );
        return Ok(());
    }
    if jobs.is_empty() && replicas.is_empty() && sources.is_empty() {
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
            "{:<16} {:<16} {:<13} {:>10} {:>10} {:>10} {:>6}  SEEN",
            "SOURCE", "JOB", "STATE", "APPLIED", "DURABLE", "RECEIVED", "EPOCH"
        );
        for r in &replicas {
            let state =
                if r["failed_over"].as_bool() == Some(true) { "failed-over".into() } else { s(&r["state"]) };
            println!(
                "{:<16} {:<16} {:<13} {:>10} {:>10} {:>10} {:>6}  {}",
                s(&r["source"]),
                s(&r["job"]),
                state,
                n(&r["applied"]),
                n(&r["durable"]),
                bytes(r["bytes_received"].as_u64()),
                n(&r["epoch"]),
                r["last_seen_secs"].as_u64().map(|t| format!("{t}s ago")).unwrap_or_else(|| "never".into()),
            );
            if let Some(f) = r["fenced_refusals"].as_u64().filter(|f| *f > 0) {
                println!("{:<16} FENCED: refused {f} connections of the old source", "");
            }
        }
    }
    if !sources.is_empty() {
        println!();
        println!("{:<16} {:<7} {:<13} {:>8} {:>7}  NEXT", "SOURCE", "POLICY", "STATE", "SILENT", "MISSED");
        for src in &sources {
            let state = s(&src["state"]);
            let next = match (src["failover_in_secs"].as_f64(), src["policy"].as_str()) {
                (Some(t), Some("auto")) => format!("fails over in {t:.0}s"),
                (Some(t), _) => format!("counts as failed in {t:.0}s"),
                (None, _) if state == "failed" && src["policy"] == "manual" => {
                    format!("manual policy: run `doppel failover {}`", s(&src["source"]))
                }
                (None, _) if state == "silent" => "the link is silent but a probe answers: not failed".into(),
                (None, _) if state == "failed-over" => {
                    format!("`doppel failback {}` once it is back", s(&src["source"]))
                }
                _ => String::new(),
            };
            println!(
                "{:<16} {:<7} {:<13} {:>7.0}s {:>3}/{:<3}  {next}",
                s(&src["source"]),
                s(&src["policy"]),
                state,
                src["silent_secs"].as_f64().unwrap_or(0.0),
                n(&src["missed"]),
                n(&src["threshold"]),
            );
            if let Some(e) = src["error"].as_str() {
                println!("{:<16} ERROR: {}", "", e.replace('\n', " "));
            }
            for j in src["jobs"].as_array().into_iter().flatten() {
                if let Some(fb) = j.get("failback").filter(|f| !f.is_null()) {
                    println!(
                        "{:<16} job {}: failback {} ({} sent, {} pending)",
                        "",
                        s(&j["job"]),
                        s(&fb["state"]),
                        bytes(fb["bytes_sent"].as_u64()),
                        bytes(fb["pending_bytes"].as_u64())
                    );
                }
            }
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
