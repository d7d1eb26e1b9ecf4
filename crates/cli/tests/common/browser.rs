//! A small Chrome DevTools Protocol client: a real headless Chromium for the dashboard tests.
//!
//! [`Browser::launch`] starts `chromium --headless --remote-debugging-port=0` with a fresh
//! profile and reads the DevTools address from its stderr; [`Browser::new_page`] opens a tab
//! (`PUT /json/new` on the debugging port) and talks to it over a WebSocket. The page collects
//! console errors (`console.error`, uncaught exceptions, and the browser's own error log:
//! failed loads, CSP violations) from before the first navigation. Chromium is killed when
//! the [`Browser`] is dropped.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

/// The viewport of pages and screenshots: a laptop screen.
pub const VIEWPORT: (u32, u32) = (1440, 900);

/// How long one DevTools call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The Chromium binaries tried, in order.
const BINARIES: [&str; 4] = ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"];

/// The path of an installed Chromium, or why there is none.
pub fn find_chromium() -> Result<PathBuf, String> {
    // A browser elsewhere: DOPPEL_CHROMIUM=/path/to/chrome.
    if let Some(p) = std::env::var_os("DOPPEL_CHROMIUM").map(PathBuf::from) {
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("DOPPEL_CHROMIUM={} is not a file", p.display()))
        };
    }
    BINARIES.iter().find_map(|b| doppel_testkit::skip::which(b).ok()).ok_or_else(|| {
        "the dashboard test needs Chromium (Debian package `chromium`), and it is not installed".into()
    })
}

/// A headless Chromium, killed when dropped.
pub struct Browser {
    child: Child,
    /// The DevTools HTTP endpoint, `127.0.0.1:PORT`.
    http: String,
    /// Chromium's stderr so far (for failure messages).
    stderr: Arc<Mutex<String>>,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium, or says why it cannot (not installed: the caller skips, or fails under
    /// `DOPPEL_TEST_STRICT=1`). A Chromium that is there but does not start is an error too.
    pub fn launch() -> Result<Browser, String> {
        let bin = find_chromium()?;
        let profile = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut child = Command::new(&bin)
            .args(flags(profile.path()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        // Chromium prints `DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID` once
        // it listens. The reader keeps draining stderr afterwards (a full pipe would stall it).
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let pipe = child.stderr.take().expect("stderr is piped");
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("DevTools listening on ws://").nth(1) {
                    let _ = tx.send(rest.split('/').next().unwrap_or_default().to_string());
                }
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let http = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} did not print its DevTools address in 60 s; stderr:\n{}",
                    bin.display(),
                    stderr.lock().unwrap()
                ));
            }
        };
        Ok(Browser { child, http, stderr, _profile: profile })
    }

    /// Chromium's stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Opens a blank tab, with console errors collected and the viewport set to [`VIEWPORT`].
    pub fn new_page(&self) -> Result<Page, String> {
        let target = http_request(&self.http, "PUT", "/json/new?about:blank")?;
        let target: Value = serde_json::from_str(&target)
            .map_err(|e| format!("DevTools /json/new answered {target:?}: {e}"))?;
        let ws_url = target["webSocketDebuggerUrl"]
            .as_str()
            .ok_or_else(|| format!("no webSocketDebuggerUrl in {target}"))?
            .to_string();
        let stream = TcpStream::connect(&self.http).map_err(|e| format!("connect {}: {e}", self.http))?;
        stream.set_nodelay(true).ok();
        // Screenshots arrive as one large frame: no frame limit, a generous message limit.
        let config = WebSocketConfig::default().max_frame_size(None).max_message_size(Some(256 << 20));
        let (ws, _) = tungstenite::client::client_with_config(ws_url.as_str(), stream, Some(config))
            .map_err(|e| format!("WebSocket handshake with {ws_url}: {e}"))?;
        // Reads time out so that a call can give up; tungstenite resumes a frame read in parts.
        ws.get_ref().set_read_timeout(Some(Duration::from_millis(200))).map_err(|e| e.to_string())?;
        let mut page = Page { ws, next_id: 0, errors: Vec::new(), loaded: false };
        // Before any navigation, so that nothing the page logs while loading is missed.
        page.call("Runtime.enable", json!({}))?;
        page.call("Log.enable", json!({}))?;
        page.call("Page.enable", json!({}))?;
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": VIEWPORT.0, "height": VIEWPORT.1, "deviceScaleFactor": 1, "mobile": false}),
        )?;
        Ok(page)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Chromium's command line (without the URL).
pub fn flags(profile: &Path) -> Vec<String> {
    [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--mute-audio",
        "--hide-scrollbars",
        "--lang=en-US",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!("--window-size={},{}", VIEWPORT.0, VIEWPORT.1),
        format!("--user-data-dir={}", profile.display()),
    ])
    .collect()
}

/// One HTTP/1.1 request to the DevTools endpoint; returns the body.
fn http_request(addr: &str, method: &str, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(CALL_TIMEOUT)).map_err(|e| e.to_string())?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("{method} {path}: {e}"))?;
    // The DevTools server may keep the connection open: read the head, then Content-Length.
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).map_err(|e| format!("{method} {path}: {e}"))?;
    let mut length = None;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).map_err(|e| format!("{method} {path}: {e}"))?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse::<usize>().ok();
        }
    }
    if !status.starts_with("HTTP/1.1 200") {
        return Err(format!("{method} {path}: {}", status.trim_end()));
    }
    let mut body = Vec::new();
    match length {
        Some(n) => {
            body.resize(n, 0);
            r.read_exact(&mut body).map_err(|e| format!("{method} {path}: {e}"))?;
        }
        None => {
            r.read_to_end(&mut body).map_err(|e| format!("{method} {path}: {e}"))?;
        }
    }
    String::from_utf8(body).map_err(|e| format!("{method} {path}: {e}"))
}

/// One tab, driven over its DevTools WebSocket.
pub struct Page {
    ws: WebSocket<TcpStream>,
    next_id: u64,
    errors: Vec<String>,
    loaded: bool,
}

impl Page {
    /// Calls `method`; returns its result. Events that arrive meanwhile are recorded.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws.send(Message::text(msg)).map_err(|e| format!("{method}: send: {e}"))?;
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let Some(v) = self.receive(deadline)? else {
                return Err(format!("{method}: no answer in {CALL_TIMEOUT:?}"));
            };
            if v["id"].as_u64() == Some(id) {
                if let Some(e) = v.get("error") {
                    return Err(format!("{method}: {e}"));
                }
                return Ok(v["result"].clone());
            }
        }
    }

    /// Reads one message, recording it if it is an event; `None` when `deadline` passed first.
    fn receive(&mut self, deadline: Instant) -> Result<Option<Value>, String> {
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    let v: Value =
                        serde_json::from_str(t.as_str()).map_err(|e| format!("DevTools sent {t}: {e}"))?;
                    self.note(&v);
                    return Ok(Some(v));
                }
                Ok(Message::Close(_)) => return Err("DevTools closed the connection".into()),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(format!("DevTools connection: {e}")),
            }
        }
    }

    /// Records console errors and the load event.
    fn note(&mut self, v: &Value) {
        let p = &v["params"];
        match v["method"].as_str() {
            Some("Runtime.consoleAPICalled") if matches!(p["type"].as_str(), Some("error" | "assert")) => {
                let args: Vec<String> = p["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| {
                        a["value"]
                            .as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| a["description"].to_string())
                    })
                    .collect();
                self.errors.push(format!(
                    "console.{}: {}",
                    p["type"].as_str().unwrap_or("error"),
                    args.join(" ")
                ));
            }
            Some("Runtime.exceptionThrown") => {
                let d = &p["exceptionDetails"];
                let what = d["exception"]["description"].as_str().or(d["text"].as_str()).unwrap_or("?");
                self.errors.push(format!("uncaught exception: {what} ({}:{})", d["url"], d["lineNumber"]));
            }
            Some("Log.entryAdded") if p["entry"]["level"] == "error" => {
                let e = &p["entry"];
                self.errors.push(format!("{} error: {} {}", e["source"], e["text"], e["url"]));
            }
            Some("Page.loadEventFired") => self.loaded = true,
            _ => {}
        }
    }

    /// Reads whatever events are waiting (without waiting for more).
    fn drain(&mut self) -> Result<(), String> {
        self.ws.get_ref().set_nonblocking(true).map_err(|e| e.to_string())?;
        let r = loop {
            match self.receive(Instant::now()) {
                Ok(Some(_)) => {}
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        self.ws.get_ref().set_nonblocking(false).map_err(|e| e.to_string())?;
        r
    }

    /// Loads `url` and waits for its load event.
    pub fn navigate(&mut self, url: &str) -> Result<(), String> {
        self.loaded = false;
        let r = self.call("Page.navigate", json!({"url": url}))?;
        if let Some(e) = r["errorText"].as_str() {
            return Err(format!("navigate to {url}: {e}"));
        }
        let deadline = Instant::now() + CALL_TIMEOUT;
        while !self.loaded {
            if self.receive(deadline)?.is_none() {
                return Err(format!("{url} did not finish loading in {CALL_TIMEOUT:?}"));
            }
        }
        Ok(())
    }

    /// Evaluates `expr` in the page (promises awaited); returns its value as JSON. A thrown
    /// exception is an error.
    pub fn eval(&mut self, expr: &str) -> Result<Value, String> {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        )?;
        if let Some(d) = r.get("exceptionDetails") {
            let what = d["exception"]["description"].as_str().or(d["text"].as_str()).unwrap_or("?");
            return Err(format!("evaluating {expr:?} threw: {what}"));
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluates `expr` until `accept` takes its value (`Ok`), at most `timeout`; panics
    /// naming `what` and the last value otherwise.
    pub fn wait_for<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        expr: &str,
        mut accept: impl FnMut(&Value) -> Result<T, String>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let (last, why) = match self.eval(expr) {
                Ok(v) => match accept(&v) {
                    Ok(t) => return t,
                    Err(why) => (v, why),
                },
                Err(e) => (Value::Null, e),
            };
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}: {why}; last value: {last}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The console errors so far (errors logged while the page loaded included).
    pub fn console_errors(&mut self) -> Vec<String> {
        if let Err(e) = self.drain() {
            self.errors.push(format!("DevTools: {e}"));
        }
        self.errors.clone()
    }

    /// Saves a PNG of the viewport to `path` (its directory created).
    pub fn screenshot(&mut self, path: &Path) -> Result<(), String> {
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}))?;
        let data = r["data"].as_str().ok_or("Page.captureScreenshot returned no data")?;
        let png =
            base64::engine::general_purpose::STANDARD.decode(data).map_err(|e| format!("screenshot: {e}"))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        std::fs::write(path, png).map_err(|e| format!("{}: {e}", path.display()))
    }
}
