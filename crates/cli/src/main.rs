//! The `doppel` binary: parses the command line, sets up logging, and hands over to the
//! command. Everything else lives in the library crates.

/// `println!` that returns a failed write of the output (a full disk, a closed pipe while
/// SIGPIPE is ignored) as an error naming it, where `println!` panics.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*)
            .map_err(|e| anyhow::anyhow!("cannot write the output: {e}"))
    }};
}

mod cli;
mod commands;
mod config;
mod control;
mod home;
mod http;
mod notices;
mod overview;
mod progress;
mod systemd;

use clap::Parser;

fn main() {
    bound_malloc_arenas();
    let args = cli::Cli::parse();
    if args.command.only_prints() {
        end_quietly_when_the_reader_goes();
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("DOPPEL_LOG").unwrap_or_else(|_| {
        // fuser answers the kernel's FUSE_INTERRUPT with ENOSYS on whichever cloned device
        // the interrupt arrived, where the kernel no longer knows the request, and logs the
        // refused reply as an error: noise, not a fault (the request itself completes).
        let level = if args.quiet { "warn" } else { "info" };
        tracing_subscriber::EnvFilter::new(format!("{level},fuser::reply=off"))
    });
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Around the progress bars while any is drawn.
        .with_writer(progress::LogWriter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    progress::set_quiet(args.quiet);
    // The fuse capture daemon needs a descriptor per file open through its mount.
    let nofile = doppel_capture::fuse::raise_open_file_limit();
    tracing::debug!(nofile, "open-file limit");
    if let Err(e) = commands::run(args) {
        eprintln!("doppel: error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// The error and its causes on one line, as scripts expect. A cause is left out when the
/// message before it already ends with it: library errors say their source (`PATH: Not a
/// directory`) and carry it as their source too, which printed it twice.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.ends_with(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg.replace('\n', " ")
}

/// Lets a command whose whole work is printing end as `ls` does when the reader of its output
/// goes away (`doppel status | head`): Rust starts with SIGPIPE ignored, so the next `println!`
/// on the closed pipe panicked with a backtrace. The daemons and a restore keep it ignored: a
/// reader going away must not stop a job or a restore midway.
fn end_quietly_when_the_reader_goes() {
    // SAFETY: restoring a signal's default disposition, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Caps glibc's malloc at two arenas. By default each thread that allocates gets an arena of
/// its own (up to eight per core), and a record allocated by the capture thread but freed by
/// the link's thread leaves its pages resident in the capture thread's arena: a mirror of
/// 200,000 small files measured 120 MiB resident for 52 MiB of heap, and 76 MiB with two
/// arenas (`crates/cli/tests/many_files.rs`). `MALLOC_ARENA_MAX` in the environment still wins.
fn bound_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a tunable; it is called before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
    // glibc gives freed memory back only from the top of an arena; a queue of small records
    // freed in another order than it was allocated leaves free pages in the middle, resident.
    // A mirror of 1,000,000 small files grew the agent by ~0.6 MiB/s with its queue at a steady
    // 16 MiB. `malloc_trim` returns every whole free page (a few milliseconds), every 5 s.
    let trim = std::thread::Builder::new().name("malloc-trim".into()).spawn(|| {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(5));
            // SAFETY: malloc_trim is thread-safe and only releases free memory.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    });
    if let Err(e) = trim {
        eprintln!("doppel: warning: no thread to return freed memory: {e}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_that_says_its_source_prints_it_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("{path}: {source}")]
        struct AtPath {
            path: String,
            source: std::io::Error,
        }
        let io = std::io::Error::from_raw_os_error(20);
        let e = anyhow::Error::from(AtPath { path: "/x/afile/r".into(), source: io }).context("job s");
        assert_eq!(super::one_line(&e), "job s: /x/afile/r: Not a directory (os error 20)");
        let plain = anyhow::anyhow!("no target\non two lines").context("job t");
        assert_eq!(super::one_line(&plain), "job t: no target on two lines");
    }
}
