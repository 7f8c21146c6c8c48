//! `courier`: one binary for the scheduler, the workers and the CLI.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod snapshot_cmd;
mod validate;

#[derive(Debug, Parser)]
#[command(
    name = "courier",
    version,
    about = "Dispatch agent workflows to shared-nothing workers over RabbitMQ"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a config folder: every workflow and agent resource, all errors at once.
    Validate {
        /// The config folder (holding workflows/ and agents/).
        #[arg(long, env = "COURIER_CONFIG_DIR", default_value = "config")]
        config_dir: PathBuf,
    },
    /// Build and inspect step snapshots.
    #[command(subcommand)]
    Snapshot(snapshot_cmd::SnapshotCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate { config_dir } => validate::run(&config_dir),
        Command::Snapshot(cmd) => snapshot_cmd::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
