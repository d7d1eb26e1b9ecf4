//! `doppel generate`: manual pages and shell completions made from the command line's own
//! definitions, for packagers (hidden from `--help`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{CommandFactory, Subcommand};
use clap_complete::Shell;

/// What to generate.
#[derive(Subcommand, Debug)]
pub enum GenerateCommand {
    /// One manual page (section 1) per command: doppel.1, doppel-protect.1,
    /// doppel-history-restore.1...
    Man {
        /// The directory to write them into (created if needed).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Completions for bash (doppel.bash), zsh (_doppel) and fish (doppel.fish).
    Completions {
        /// The directory to write them into (created if needed).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

/// Runs `doppel generate ...`; prints each file written.
pub fn run(c: GenerateCommand) -> Result<()> {
    let written = match c {
        GenerateCommand::Man { dir } => man(&dir),
        GenerateCommand::Completions { dir } => completions(&dir),
    }?;
    for f in written {
        outln!("{}", f.display())?;
    }
    Ok(())
}

/// The command line as the binary parses it, named as installed.
fn command() -> clap::Command {
    let mut cmd = crate::cli::Cli::command().bin_name("doppel");
    cmd.build();
    cmd
}

/// Writes a page for the command and for every visible subcommand, nested ones included.
fn man(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    page(command().disable_help_subcommand(true), env!("CARGO_PKG_VERSION"), dir, &mut written)?;
    Ok(written)
}

fn page(cmd: clap::Command, version: &str, dir: &Path, written: &mut Vec<PathBuf>) -> Result<()> {
    let man = clap_mangen::Man::new(cmd.clone()).source(format!("doppel {version}")).manual("doppel manual");
    let path = man.generate_to(dir).with_context(|| format!("cannot write a page into {}", dir.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        page(sub.clone(), version, dir, written)?;
    }
    Ok(())
}

/// Writes the completion scripts of bash, zsh and fish.
fn completions(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // The generators list hidden subcommands too: offer only the visible ones.
    let full = crate::cli::Cli::command();
    let mut cmd = clap::Command::new("doppel")
        .version(env!("CARGO_PKG_VERSION"))
        .about(full.get_about().cloned().unwrap_or_default())
        .args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
        .bin_name("doppel");
    cmd.build();
    [Shell::Bash, Shell::Zsh, Shell::Fish]
        .into_iter()
        .map(|shell| {
            clap_complete::generate_to(shell, &mut cmd, "doppel", dir)
                .with_context(|| format!("cannot write the {shell} completions into {}", dir.display()))
        })
        .collect()
}
