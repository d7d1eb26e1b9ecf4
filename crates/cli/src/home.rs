//! Where a node keeps its identity and state.

use std::path::PathBuf;

/// `--home`, else `$DOPPEL_HOME`, else the config file's `home`, else `/var/lib/doppel` for
/// root and the XDG state directory (`$XDG_STATE_HOME/doppel`, by default
/// `~/.local/state/doppel`) for anyone else.
pub fn resolve(flag: Option<PathBuf>, config: Option<PathBuf>) -> PathBuf {
    if let Some(h) = flag {
        return h;
    }
    if let Some(h) = std::env::var_os("DOPPEL_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    if let Some(h) = config {
        return h;
    }
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/doppel");
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("doppel");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/state/doppel")
}

/// Writes `path` aside then renames it: whoever reads it (scripts, tests) sees the whole
/// content or no file, never a part.
pub fn write_atomically(path: &std::path::Path, content: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)
}
