//! The `fieldbridge` command line: a thin layer over the library; everything a test
//! needs lives in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use fieldbridge::{config, store};

/// Where the Debian package and the systemd unit put the configuration.
const DEFAULT_CONFIG: &str = "/etc/fieldbridge/fieldbridge.toml";

#[derive(Parser)]
#[command(name = "fieldbridge", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration file, then print the devices, read plans and topics.
    CheckConfig {
        /// Configuration file.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Inspect the store-and-forward queue.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Depth, bytes, oldest age, counters and drops (opens the database read-only).
    Stats(QueueArgs),
}

#[derive(Args)]
struct QueueArgs {
    /// Configuration file naming the database (`store.path`).
    #[arg(short, long, default_value = DEFAULT_CONFIG, conflicts_with = "db")]
    config: PathBuf,
    /// The database file itself.
    #[arg(long)]
    db: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckConfig { config } => check_config(&config),
        Command::Queue {
            command: QueueCommand::Stats(args),
        } => queue_stats(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: &Path) -> anyhow::Result<()> {
    let config = config::load(path)?;
    let prefix = config.agent.resolved_prefix(&config::hostname());
    println!("{}: ok", path.display());
    println!("prefix: {prefix}");
    println!(
        "local broker: {}",
        if config.broker.is_some() {
            "yes"
        } else {
            "none"
        }
    );
    match &config.upstream {
        Some(_) => println!("upstream: yes, store {}", config.store.path.display()),
        None => println!("upstream: none (LAN-only, no store)"),
    }
    println!("buses: {}", config.bus.len());
    Ok(())
}

fn queue_stats(args: &QueueArgs) -> anyhow::Result<()> {
    let path = match &args.db {
        Some(db) => db.clone(),
        None => config::load(&args.config)?.store.path,
    };
    let stats = store::read_stats(&path)
        .with_context(|| format!("cannot read queue statistics from {}", path.display()))?;
    println!("{}", serde_json::to_string_pretty(&stats)?);
    Ok(())
}
