//! The endpoint over real sockets: binding rules, authentication, routes.

use std::io::{Read, Write};

use super::*;

/// One HTTP/1.1 request on a fresh connection: (status code, headers, body).
fn request(addr: SocketAddr, path: &str, headers: &[&str]) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: doppel\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, head.to_string(), body.to_string())
}

/// A server on a loopback port over an empty home; dropped, it stops.
struct Server {
    addr: SocketAddr,
    stop: CancellationToken,
    _home: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn server(token: Option<&str>) -> Server {
    let home = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let token_file = token.map(|t| {
        let f = home.path().join("token");
        std::fs::write(&f, format!("{t}\n")).unwrap();
        f
    });
    let opts = HttpOptions { addr: "127.0.0.1:0".into(), token_file };
    let bound = rt.block_on(bind(&opts)).unwrap();
    let addr = bound.local_addr().unwrap();
    let stop = CancellationToken::new();
    rt.spawn(serve(bound, home.path().to_path_buf(), stop.clone()));
    Server { addr, stop, _home: home, _rt: rt }
}

#[test]
fn routes_answer_on_loopback_without_a_token() {
    let s = server(None);
    let (code, head, body) = request(s.addr, "/api/status", &[]);
    assert_eq!(code, 200, "{head}\n{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v, serde_json::json!({ "schema": 1, "jobs": [], "replicas": [], "sources": [] }));
    let (code, head, body) = request(s.addr, "/metrics", &[]);
    assert_eq!(code, 200);
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    assert!(body.contains("doppel_build_info{version=\""), "{body}");
    let (code, _, body) = request(s.addr, "/api/events", &[]);
    assert_eq!((code, body.as_str()), (200, r#"{"schema":1,"events":[]}"#));
    let (code, _, body) = request(s.addr, "/api/lag", &[]);
    assert_eq!(code, 200);
    assert!(body.starts_with(r#"{"schema":1,"interval_secs":2,"series":"#), "{body}");
    let (code, head, body) = request(s.addr, "/", &[]);
    assert_eq!(code, 200);
    assert!(head.contains("content-security-policy"), "{head}");
    assert!(body.contains("dashboard.js"), "{body}");
    assert_eq!(request(s.addr, "/nothing", &[]).0, 404);
}

#[test]
fn a_token_guards_every_route() {
    let token = "s3cret-token-of-twenty";
    let s = server(Some(token));
    for path in ["/", "/metrics", "/api/status", "/api/events", "/api/lag", "/assets/dashboard.js"] {
        let (code, head, body) = request(s.addr, path, &[]);
        assert_eq!(code, 401, "{path}: {head}");
        assert!(body.contains("Authorization: Bearer"), "{body}");
        assert_eq!(request(s.addr, path, &["Authorization: Bearer wrong-token-guess-1234"]).0, 401, "{path}");
        let bearer = format!("Authorization: Bearer {token}");
        assert_eq!(request(s.addr, path, &[&bearer]).0, 200, "{path}");
    }
    // A browser opens the page once with the token: it gets a cookie and the address without it.
    let (code, head, _) = request(s.addr, &format!("/?token={token}"), &[]);
    assert_eq!(code, 303, "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("location: /\r\n"), "{head}");
    assert!(
        lower.contains(&format!("set-cookie: doppel_token={token}; path=/; httponly; samesite=strict")),
        "{head}"
    );
    let cookie = format!("Cookie: theme=dark; doppel_token={token}");
    assert_eq!(request(s.addr, "/api/status", &[&cookie]).0, 200);
    assert_eq!(request(s.addr, "/?token=not-the-token-at-all", &[]).0, 401);
    assert_eq!(request(s.addr, "/metrics", &["Cookie: doppel_token=not-the-token-at-all"]).0, 401);
}

#[test]
fn binding_refuses_what_it_cannot_serve_safely() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Not loopback, no token.
    let e = rt.block_on(bind(&HttpOptions { addr: "0.0.0.0:0".into(), token_file: None })).err().unwrap();
    assert!(format!("{e:#}").contains("needs --http-token-file"), "{e:#}");
    // A short token.
    let short = dir.path().join("short");
    std::fs::write(&short, "abc\n").unwrap();
    let e =
        rt.block_on(bind(&HttpOptions { addr: "0.0.0.0:0".into(), token_file: Some(short) })).err().unwrap();
    assert!(format!("{e:#}").contains("at least 16 characters"), "{e:#}");
    // A missing token file.
    let e = rt
        .block_on(bind(&HttpOptions {
            addr: "127.0.0.1:0".into(),
            token_file: Some(dir.path().join("none")),
        }))
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("HTTP token file"), "{e:#}");
    // A port in use: one line naming the address.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let e = rt.block_on(bind(&HttpOptions { addr: addr.clone(), token_file: None })).err().unwrap();
    let msg = format!("{e:#}");
    assert!(msg.contains(&format!("cannot serve HTTP on {addr}")) && msg.contains("in use"), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
}
