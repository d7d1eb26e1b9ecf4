//! Text a peer controls, bounded wherever it is echoed.
//!
//! Names, paths and reasons from the other side end up in log lines, errors and refusals
//! sent back. A peer may make them as long as a frame allows (a 60 MiB path name), and every
//! echo would copy all of it into the log and onto the wire again. Every such echo goes
//! through this module: at most [`ECHO_MAX`] bytes of the text are shown, followed by its
//! whole length when it was cut, e.g. `aaaa… (62914560 bytes)`.
//!
//! - [`Truncated`]: a borrowed name or path, for `format!` and `tracing` fields
//!   (`%Truncated(&s)`); [`TruncatedText`] the same for a peer's whole message (a reason), at
//!   [`TEXT_MAX`] bytes.
//! - [`Echoed`]: an owned, already bounded copy, for errors that keep the text.
//! - [`truncated_debug`]: the `Debug` form of any value, formatted no further than the bound
//!   (a message of many megabytes is not formatted whole only to be cut).

use std::fmt::{self, Write};

/// Most bytes of peer-controlled text shown in one echo.
pub const ECHO_MAX: usize = 200;

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn head(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Most bytes of a peer's whole message (a reason, an error text) shown in one echo: such
/// text is made of names already bounded and words, and its end is usually what matters.
pub const TEXT_MAX: usize = 1024;

/// A name or a path from a peer, shown bounded: at most [`ECHO_MAX`] bytes of it, then
/// `… (N bytes)` if it was longer. `Debug` quotes and escapes the part shown.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Truncated<'a>(pub &'a str);

/// A peer's whole message (a refusal's or a goodbye's reason), shown bounded as
/// [`Truncated`] but at [`TEXT_MAX`] bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TruncatedText<'a>(pub &'a str);

fn show(f: &mut fmt::Formatter<'_>, s: &str, max: usize, debug: bool) -> fmt::Result {
    let h = head(s, max);
    if debug {
        write!(f, "{h:?}")?
    } else {
        f.write_str(h)?
    }
    if h.len() < s.len() { write!(f, "… ({} bytes)", s.len()) } else { Ok(()) }
}

impl fmt::Display for Truncated<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        show(f, self.0, ECHO_MAX, false)
    }
}

impl fmt::Debug for Truncated<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        show(f, self.0, ECHO_MAX, true)
    }
}

impl fmt::Display for TruncatedText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        show(f, self.0, TEXT_MAX, false)
    }
}

impl fmt::Debug for TruncatedText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        show(f, self.0, TEXT_MAX, true)
    }
}

fn cut_suffix(f: &mut fmt::Formatter<'_>, len: usize) -> fmt::Result {
    if len > ECHO_MAX { write!(f, "… ({len} bytes)") } else { Ok(()) }
}

/// An owned echo of peer-controlled text: the part [`Truncated`] would show, and the whole
/// length. Displays (and debugs) exactly as [`Truncated`] of the original.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Echoed {
    head: String,
    len: usize,
}

impl Echoed {
    /// The echo of `s`.
    pub fn new(s: &str) -> Echoed {
        Echoed { head: head(s, ECHO_MAX).to_string(), len: s.len() }
    }

    /// The echo of raw bytes, as text (invalid UTF-8 replaced); only the bytes shown are
    /// converted.
    pub fn lossy(bytes: &[u8]) -> Echoed {
        // A character is at most 4 bytes: this covers every one that may be shown.
        let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(ECHO_MAX + 4)]);
        Echoed { head: head(&shown, ECHO_MAX).to_string(), len: bytes.len() }
    }

    /// The part shown.
    pub fn shown(&self) -> &str {
        &self.head
    }

    /// The length of the whole text, in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the whole text was empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Display for Echoed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.head)?;
        cut_suffix(f, self.len)
    }
}

impl fmt::Debug for Echoed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.head)?;
        cut_suffix(f, self.len)
    }
}

impl From<&str> for Echoed {
    fn from(s: &str) -> Echoed {
        Echoed::new(s)
    }
}

/// `s` bounded as [`Truncated`] shows it, as a string (for a name carried back to the peer).
pub fn truncated(s: &str) -> String {
    Truncated(s).to_string()
}

/// `s` bounded as [`TruncatedText`] shows it, as a string (for a peer's reason kept in a
/// status or carried on).
pub fn truncated_text(s: &str) -> String {
    TruncatedText(s).to_string()
}

/// The `Debug` form of `v`, bounded: formatting stops once [`ECHO_MAX`] bytes are written
/// (the total length is then not known, so the cut is marked `…` alone).
pub fn truncated_debug(v: &impl fmt::Debug) -> String {
    struct Capped {
        out: String,
        cut: bool,
    }
    impl Write for Capped {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            let room = ECHO_MAX - self.out.len();
            if s.len() <= room {
                self.out.push_str(s);
                return Ok(());
            }
            self.out.push_str(head(s, room));
            self.cut = true;
            // Stops the formatting: nothing more is wanted.
            Err(fmt::Error)
        }
    }
    let mut c = Capped { out: String::new(), cut: false };
    let _ = write!(c, "{v:?}");
    if c.cut {
        c.out.push('…');
    }
    c.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_shown_whole() {
        assert_eq!(Truncated("web-1").to_string(), "web-1");
        assert_eq!(format!("{:?}", Truncated("a\"b")), "\"a\\\"b\"");
        assert_eq!(Echoed::lossy(b"ok").to_string(), "ok");
        let exact = "x".repeat(ECHO_MAX);
        assert_eq!(Truncated(&exact).to_string(), exact);
    }

    #[test]
    fn a_60_mib_name_is_cut_to_a_bounded_echo_naming_its_length() {
        let huge = "n".repeat(60 << 20);
        let shown = Truncated(&huge).to_string();
        assert_eq!(shown, format!("{}… ({} bytes)", "n".repeat(ECHO_MAX), 60 << 20));
        let dbg = format!("{:?}", Truncated(&huge));
        assert_eq!(dbg, format!("\"{}\"… ({} bytes)", "n".repeat(ECHO_MAX), 60 << 20));
        let e = Echoed::lossy(huge.as_bytes());
        assert_eq!((e.to_string(), format!("{e:?}"), e.len()), (shown, dbg, 60 << 20));
        assert!(e.shown().len() == ECHO_MAX);
    }

    #[test]
    fn cuts_fall_on_character_boundaries() {
        // 3-byte characters: 200 is not a boundary, 198 is.
        let s = "€".repeat(100);
        let t = Truncated(&s).to_string();
        assert!(t.starts_with(&"€".repeat(66)) && t.ends_with("… (300 bytes)"), "{t}");
        // Invalid UTF-8 and a character cut by the byte limit are replaced, not a panic.
        let mut b = vec![b'a'; ECHO_MAX - 1];
        b.extend_from_slice("€".as_bytes());
        b.extend_from_slice(&[0xff; 1000]);
        let e = Echoed::lossy(&b);
        assert!(e.shown().len() <= ECHO_MAX && e.to_string().ends_with("… (1202 bytes)"), "{e}");
    }

    #[test]
    fn debug_of_a_huge_value_is_formatted_no_further_than_the_bound() {
        let v = vec![7u8; 10 << 20];
        let d = truncated_debug(&v);
        assert!(d.starts_with("[7, 7, ") && d.ends_with('…') && d.len() <= ECHO_MAX + 3, "{d}");
        assert_eq!(truncated_debug(&Some(1)), "Some(1)");
    }

    #[test]
    fn whole_messages_keep_more() {
        let reason = "r".repeat(TEXT_MAX + 1);
        assert_eq!(truncated_text(&reason), format!("{}… ({} bytes)", "r".repeat(TEXT_MAX), TEXT_MAX + 1));
        let fits = "r".repeat(TEXT_MAX);
        assert_eq!(truncated_text(&fits), fits);
        assert!(truncated(&fits).ends_with("… (1024 bytes)"));
    }
}
