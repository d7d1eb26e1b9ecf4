//! The subcommands.

mod failover;
pub mod generate;
mod history;
mod protect;
mod status;
mod target;

use anyhow::Result;
use doppel_link::Identity;
use tokio_util::sync::CancellationToken;

use crate::cli::{Cli, Command};
use crate::config::FileConfig;
use crate::home;

/// Runs the parsed command line.
pub fn run(args: Cli) -> Result<()> {
    let file = FileConfig::load(args.config.as_deref())?;
    // `$DOPPEL_HOME` overrides the config file's `home`, as the file's documentation says.
    let home = home::resolve(args.home.clone(), file.home.clone());
    match args.command {
        Command::Init => {
            let (me, created) = Identity::load_or_create(&home)?;
            if created {
                eprintln!("created identity in {}", home.join("identity").display());
            }
            outln!("{}", me.id)?;
            Ok(())
        }
        Command::Id => {
            outln!("{}", Identity::load(&home)?.id)?;
            Ok(())
        }
        Command::Target(a) => runtime()?.block_on(target::run(a, file, args.config.clone(), home)),
        Command::Reload => target::reload(&home),
        Command::Protect(a) => runtime()?.block_on(protect::run(a, file, home)),
        Command::Status(a) => status::run(a, &home),
        Command::Verify(a) => status::verify(a, &home),
        Command::Limit(a) => status::limit(a, &home),
        Command::Failover(a) => failover::run(a, false, &home),
        Command::Failback(a) => failover::run(a, true, &home),
        Command::Events(a) => failover::events(a, &home),
        Command::History(c) => history::run(c, &file, &home),
        Command::TestFailover(a) => failover::test(a, &home),
        Command::Generate(c) => generate::run(c),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("doppel").build()?)
}

/// A token cancelled on SIGINT or SIGTERM.
fn on_signals() -> Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("signal received, stopping");
        crate::systemd::stopping();
        t.cancel();
    });
    Ok(token)
}
