//! Who may read the endpoint.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The cookie the dashboard page keeps the token in.
const COOKIE: &str = "doppel_token";

/// The shortest token accepted: a guessable one would open the endpoint to anyone.
const MIN_TOKEN: usize = 16;

/// Whether requests need a token.
#[derive(Clone)]
pub enum Access {
    /// Anyone who can connect (loopback only).
    Open,
    /// Requests must carry the token; its hash is kept so that comparing takes the same time
    /// whatever the guess.
    Token(blake3::Hash),
}

impl Access {
    /// Access with `token`.
    pub fn token(token: String) -> Access {
        Access::Token(blake3::hash(token.as_bytes()))
    }

    fn allows(&self, given: Option<&str>) -> bool {
        match self {
            Access::Open => true,
            // blake3::Hash compares in constant time.
            Access::Token(h) => given.is_some_and(|g| blake3::hash(g.as_bytes()) == *h),
        }
    }
}

/// Reads the token: the file's first line, at least [`MIN_TOKEN`] characters.
pub fn read_token(path: &Path) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("HTTP token file {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.len() < MIN_TOKEN {
        bail!(
            "HTTP token file {}: the token (its first line) must be at least {MIN_TOKEN} characters",
            path.display()
        );
    }
    Ok(token)
}

/// The token a request carries: `Authorization: Bearer TOKEN`, else the page's cookie.
fn carried(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        return v.strip_prefix("Bearer ").map(str::trim);
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// The token in `?token=...` of a request for the page.
fn in_query(req: &Request) -> Option<String> {
    let q = req.uri().query()?;
    url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "token").map(|(_, v)| v.into_owned())
}

/// The middleware: lets a request through, turns a page visit with a valid `?token=` into the
/// cookie (and a redirect that drops the token from the address bar), or answers 401.
pub async fn check(State(access): State<Arc<Access>>, req: Request, next: Next) -> Response {
    if access.allows(carried(req.headers())) {
        return next.run(req).await;
    }
    if req.uri().path() == "/"
        && let Some(token) = in_query(&req)
        && access.allows(Some(&token))
    {
        let cookie = format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict");
        let mut r = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        return r;
    }
    let mut r = (
        StatusCode::UNAUTHORIZED,
        "authentication required: send Authorization: Bearer TOKEN (the token of --http-token-file), or open /?token=TOKEN once in a browser\n",
    )
        .into_response();
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"doppel\""));
    r
}
