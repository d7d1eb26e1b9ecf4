//! Missing prerequisites: skip the test on a developer's machine, fail it in CI.
//!
//! Many tests need root, `/dev/fuse`, loop devices, network namespaces or a tool such as
//! `sqlite3`. Where one is missing a test used to print "skipping" and pass, so a CI machine
//! without them went green having tested nothing. With `DOPPEL_TEST_STRICT=1` (set by
//! `.ci/run`) a missing prerequisite fails the test instead; without it the test is skipped
//! with a note on stderr.
//!
//! ```ignore
//! if !doppel_testkit::require(fuse_ok, "the fuse capture tests need root and /dev/fuse") {
//!     return;
//! }
//! ```

use std::ffi::OsStr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The environment variable that turns skips into failures.
pub const STRICT_VAR: &str = "DOPPEL_TEST_STRICT";

/// What to do about a missing prerequisite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Skip the test; the note to print.
    Skip(String),
    /// Fail the test; the panic message.
    Fail(String),
}

/// The decision for `reason`, given the value of `DOPPEL_TEST_STRICT` (unset, empty or `0`:
/// skip; `1`: fail). Any other value fails too, naming the variable, so a typo such as
/// `DOPPEL_TEST_STRICT=yes` cannot quietly turn strictness off.
pub fn verdict(strict: Option<&OsStr>, reason: &str) -> Verdict {
    match strict.map(|v| v.to_str()) {
        None | Some(Some("" | "0")) => Verdict::Skip(format!("skipping: {reason}")),
        Some(Some("1")) => Verdict::Fail(format!("{STRICT_VAR}=1 and {reason}")),
        Some(other) => Verdict::Fail(format!("{STRICT_VAR} must be 0 or 1, not {other:?} ({reason})")),
    }
}

/// A prerequisite is missing: panics under `DOPPEL_TEST_STRICT=1`, otherwise prints
/// "skipping: `reason`" to stderr. The caller returns from the test afterwards.
pub fn skip_or_fail(reason: &str) {
    match verdict(std::env::var_os(STRICT_VAR).as_deref(), reason) {
        Verdict::Skip(note) => eprintln!("{note}"),
        Verdict::Fail(msg) => panic!("{msg}"),
    }
}

/// Whether the test may go on: `true` when `ok`; otherwise [`skip_or_fail`] with `reason`
/// and `false` (the caller returns).
pub fn require(ok: bool, reason: &str) -> bool {
    if !ok {
        skip_or_fail(reason);
    }
    ok
}

/// [`require`] for a prerequisite found by a lookup: the value, or `None` after
/// [`skip_or_fail`] with the lookup's reason.
pub fn require_ok<T>(found: Result<T, String>) -> Option<T> {
    found.map_err(|reason| skip_or_fail(&reason)).ok()
}

/// Whether FUSE file systems can be mounted here: root, and `/dev/fuse` the FUSE character
/// device (10:229). A path that merely exists is not enough: a container may bind something
/// else there.
pub fn fuse_usable() -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("the fuse capture mounts over the protected tree and needs root".into());
    }
    let dev = Path::new("/dev/fuse");
    match std::fs::metadata(dev) {
        Ok(m)
            if m.file_type().is_char_device()
                && (rustix::fs::major(m.rdev()), rustix::fs::minor(m.rdev())) == (10, 229) =>
        {
            Ok(())
        }
        Ok(_) => Err("/dev/fuse is not the FUSE device (10:229)".into()),
        Err(e) => Err(format!("/dev/fuse is not usable (no FUSE in this kernel or container): {e}")),
    }
}

/// [`require`] for [`fuse_usable`].
pub fn require_fuse() -> bool {
    require_ok(fuse_usable()).is_some()
}

/// The full path of a tool, searched in `PATH` and the sbin directories (root's tools live
/// there and a test runner's `PATH` may lack them).
pub fn which(name: &str) -> Result<PathBuf, String> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("`{name}` is not installed"))
}

/// The paths of the tools a test needs, or `None` after [`skip_or_fail`] naming the first
/// one missing.
pub fn require_tools<const N: usize>(names: [&str; N]) -> Option<[PathBuf; N]> {
    let paths: Result<Vec<PathBuf>, String> = names.into_iter().map(which).collect();
    require_ok(paths).map(|p| p.try_into().expect("one path per name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Option<&OsStr> {
        Some(OsStr::new(s))
    }

    #[test]
    fn unset_empty_or_zero_skips_with_the_reason() {
        for env in [None, v(""), v("0")] {
            assert_eq!(verdict(env, "no fuse"), Verdict::Skip("skipping: no fuse".into()), "{env:?}");
        }
    }

    #[test]
    fn one_fails_naming_the_variable_and_the_reason() {
        assert_eq!(verdict(v("1"), "no fuse"), Verdict::Fail("DOPPEL_TEST_STRICT=1 and no fuse".into()));
    }

    #[test]
    fn any_other_value_fails_rather_than_silently_skipping() {
        for s in ["yes", "true", "2", " 1"] {
            match verdict(v(s), "no fuse") {
                Verdict::Fail(m) => assert!(m.contains("DOPPEL_TEST_STRICT") && m.contains("no fuse"), "{m}"),
                other => panic!("{s:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_met_requirement_neither_skips_nor_fails() {
        // Whatever the environment says, `ok` is never a skip or a failure.
        assert!(require(true, "unused"));
        assert_eq!(require_ok::<u8>(Ok(7)), Some(7));
    }

    #[test]
    fn tools_are_found_in_the_path_and_missing_ones_named() {
        assert!(which("sh").is_ok());
        let e = which("doppel-no-such-tool").unwrap_err();
        assert!(e.contains("doppel-no-such-tool"), "{e}");
    }
}
