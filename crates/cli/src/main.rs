//! The `doppel` binary: parses the command line, sets up logging, and hands over to the
//! command. Everything else lives in the library crates.

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
    let args = cli::Cli::parse();
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
        // One line naming the cause, as scripts expect.
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("doppel: error: {msg}");
        std::process::exit(1);
    }
}
