//! The `fieldbridge` command line: a thin layer over the library; everything a test
//! needs lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use fieldbridge::config;

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
    /// Validate a configuration file, then print what it would run.
    CheckConfig {
        /// Configuration file.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckConfig { config } => check_config(&config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: &std::path::Path) -> anyhow::Result<()> {
    let config = config::load(path)?;
    let prefix = config.agent.resolved_prefix(&config::hostname());
    println!("{}: ok", path.display());
    println!("prefix: {prefix}");
    println!(
        "local broker: {}",
        if config.broker.is_some() { "yes" } else { "no" }
    );
    println!(
        "upstream: {}",
        if config.upstream.is_some() {
            "yes"
        } else {
            "no (LAN-only)"
        }
    );
    println!("buses: {}", config.bus.len());
    Ok(())
}
