//! `doppel target`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use doppel_link::{Identity, NodeId};
use doppel_target::{AllowedSource, Layout, Target, TargetConfig, valid_name};
use serde_json::json;

use crate::cli::TargetArgs;
use crate::config::FileConfig;
use crate::control;

pub async fn run(a: TargetArgs, file: FileConfig, home: PathBuf) -> Result<()> {
    let section = file.target.unwrap_or_default();
    let listen = a
        .listen
        .or(section.listen)
        .ok_or_else(|| anyhow!("--listen ADDR is required (or [target] listen)"))?;
    let data = a.data.or(section.data).ok_or_else(|| anyhow!("--data DIR is required (or [target] data)"))?;
    let mut allowed = Vec::new();
    for s in section.allow {
        allowed.push(allow(&s.name, &s.id)?);
    }
    for s in &a.allow {
        let (name, id) = s.split_once('=').ok_or_else(|| anyhow!("--allow {s:?}: expected NAME=ID"))?;
        allowed.push(allow(name, id)?);
    }
    std::fs::create_dir_all(&data)
        .with_context(|| format!("cannot create data directory {}", data.display()))?;
    let (me, created) = Identity::load_or_create(&home)?;
    if created {
        tracing::info!(identity = %me.id, "created this node's identity");
    }
    let mut cfg = TargetConfig::new(Layout::DataDir(data.clone()));
    cfg.allowed = allowed;
    if let Some(h) = a.heartbeat.or(section.heartbeat_secs) {
        cfg.heartbeat = std::time::Duration::from_secs(h.max(1));
    }
    let listener =
        tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let target = Target::new(cfg);
    let shutdown = super::on_signals()?;
    {
        let t = target.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            t.shutdown.cancel();
        });
    }
    let run = control::run_dir(&home);
    std::fs::create_dir_all(&run)?;
    std::fs::write(run.join("target.addr"), addr.to_string())?;
    let t = target.clone();
    let handler: control::Handler = Arc::new(move |_req| {
        let t = t.clone();
        Box::pin(async move { json!({ "replicas": t.status() }) })
    });
    tokio::spawn(control::serve(run.join("target.sock"), handler, target.shutdown.clone()));
    tracing::info!(%addr, identity = %me.id, data = %data.display(), sources = target.config.allowed.len(), "target listening");
    doppel_target::serve(target.clone(), &me, listener).await?;
    let _ = std::fs::remove_file(run.join("target.addr"));
    Ok(())
}

fn allow(name: &str, id: &str) -> Result<AllowedSource> {
    valid_name(name).map_err(|e| anyhow!("source name {e}"))?;
    let id: NodeId = id.parse().with_context(|| format!("source {name}"))?;
    Ok(AllowedSource { name: name.to_string(), id })
}
