//! The `fieldbridge` command line: a thin layer over the library; everything a test
//! needs lives in the library.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use fieldbridge::topics::Topics;
use fieldbridge::{agent, broker, config, field, store};

/// `println!` for the reports on standard output, shadowing std's: when the reader has
/// gone (`fieldbridge check-config | head -1`), the process ends quietly with the status
/// of a tool killed by SIGPIPE instead of panicking (Rust ignores SIGPIPE, so every
/// later write would fail).
macro_rules! println {
    () => { print!("\n") };
    ($($arg:tt)*) => { print!("{}\n", format_args!($($arg)*)) };
}

/// `print!` with the same handling of a closed standard output as [`println!`].
macro_rules! print {
    ($($arg:tt)*) => { write_stdout(format_args!($($arg)*)) };
}

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
    /// Run the agent (the systemd service runs this).
    Run {
        /// Configuration file.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Run on a built-in simulated Modbus device: no hardware, no config.
    Demo {
        /// Also forward readings to this upstream broker (mqtt:// or mqtts:// URL).
        #[arg(long, value_name = "URL")]
        upstream: Option<String>,
        /// First port tried for the local broker; the next free one is taken.
        #[arg(long, default_value_t = 1883)]
        port: u16,
    },
    /// Validate a configuration file and open every file it names (password and ACL
    /// files, certificates and keys), then print the devices, read plans and topics.
    CheckConfig {
        /// Configuration file.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Check with the rights of this user, e.g. the service's `fieldbridge` (needs
        /// root).
        #[arg(long, value_name = "USER")]
        as_user: Option<String>,
    },
    /// Read registers from a Modbus device and print every decoding of them (types ×
    /// byte orders), plus the TOML for the chosen one.
    Probe(ProbeArgs),
    /// Inspect the store-and-forward queue.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Add or replace a user in a mosquitto-format password file. The password is read
    /// from standard input: on a terminal asked twice and not echoed, else one line.
    /// An existing file keeps its owner, group and mode; a new one is created 0640 with
    /// the group of its directory.
    Passwd {
        /// Batch mode, as mosquitto_passwd -b: the password is the third argument.
        #[arg(short = 'b', requires = "password")]
        batch: bool,
        /// Password file; created if missing.
        file: PathBuf,
        /// User name.
        user: String,
        /// With -b: the password.
        #[arg(requires = "batch")]
        password: Option<String>,
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

#[derive(Args)]
#[command(group(clap::ArgGroup::new("transport").required(true).args(["tcp", "rtu"])))]
struct ProbeArgs {
    /// Modbus TCP device: HOST or HOST:PORT (port 502 by default).
    #[arg(long, value_name = "HOST[:PORT]")]
    tcp: Option<String>,
    /// RTU frames over TCP (serial device servers) instead of Modbus TCP.
    #[arg(long, requires = "tcp")]
    rtu_over_tcp: bool,
    /// Modbus RTU on a serial port, e.g. /dev/ttyUSB0.
    #[arg(long, value_name = "DEVICE")]
    rtu: Option<String>,
    #[arg(long, default_value_t = 9600)]
    baud: u32,
    /// none, even or odd.
    #[arg(long, default_value = "even")]
    parity: String,
    #[arg(long, default_value_t = 8)]
    data_bits: u8,
    #[arg(long, default_value_t = 1)]
    stop_bits: u8,
    /// Unit (slave) id.
    #[arg(long, default_value_t = 1)]
    unit: u8,
    /// coil, discrete, input or holding.
    #[arg(long)]
    kind: String,
    /// 0-based protocol address of the first register (holding 0 = 40001).
    #[arg(long)]
    address: u16,
    /// Registers (or bits) to read.
    #[arg(long, default_value_t = 4)]
    count: u16,
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// Pick the decoding whose value is closest to this (e.g. what the display shows),
    /// trying the common scales ×0.001 … ×1000 too.
    #[arg(long, conflicts_with = "data_type", allow_hyphen_values = true)]
    expect: Option<f64>,
    /// Pick this type (u16, i32, f32, …) for the TOML snippet; needs --order.
    #[arg(long = "type", requires = "order")]
    data_type: Option<String>,
    /// ABCD, BADC, CDAB or DCBA.
    #[arg(long, requires = "data_type")]
    order: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run(&config),
        Command::Demo { upstream, port } => demo(upstream, port),
        Command::CheckConfig { config, as_user } => match as_user {
            Some(user) => check_config_as(&config, &user),
            None => check_config(&config),
        },
        Command::Passwd {
            file,
            user,
            password,
            ..
        } => passwd(&file, &user, password),
        Command::Probe(args) => probe(&args),
        Command::Queue {
            command: QueueCommand::Stats(args),
        } => queue_stats(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!(
                "error: {}",
                fieldbridge::problem::each_cause_once(err.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

/// Exit status of a process killed by SIGPIPE, as a shell reports it.
const EXIT_BROKEN_PIPE: i32 = 128 + 13;

/// Writes to standard output; a reader that has gone ends the process quietly.
fn write_stdout(args: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    if let Err(err) = stdout.write_fmt(args) {
        if err.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(EXIT_BROKEN_PIPE);
        }
        eprintln!("error: cannot write to standard output: {err}");
        std::process::exit(1);
    }
}

/// Logs to stderr; under systemd (JOURNAL_STREAM set) without timestamps or colours,
/// since the journal stamps every line itself. `RUST_LOG` overrides `level`. Both are
/// `Targets` directives (`info,fieldbridge::field=debug`): they need no regex engine,
/// which `EnvFilter` would add to the binary.
fn init_logging(level: &str) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let from_env = std::env::var("RUST_LOG")
        .ok()
        .and_then(|directives| directives.parse::<Targets>().ok());
    let filter = from_env
        .or_else(|| level.parse().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO));
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        registry.with(layer.without_time().with_ansi(false)).init();
    } else {
        registry
            .with(layer.with_ansi(std::io::stderr().is_terminal()))
            .init();
    }
}

/// The agent's runtime ([`agent::runtime`]).
fn runtime(worker_threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    agent::runtime(worker_threads).context("cannot start the async runtime")
}

fn run(path: &Path) -> anyhow::Result<()> {
    let config = config::load(path)?;
    init_logging(&config.agent.log_level);
    tracing::info!(config = %path.display(), "starting");
    runtime(config.agent.worker_threads)?.block_on(agent::run(config, Some(path.to_path_buf())))?;
    Ok(())
}

fn demo(upstream: Option<String>, port: u16) -> anyhow::Result<()> {
    init_logging("info");
    runtime(1)?.block_on(agent::demo::run(upstream, port))?;
    Ok(())
}

fn check_config(path: &Path) -> anyhow::Result<()> {
    let checked = config::check(path)?;
    let config = &checked.config;
    for warning in &checked.warnings {
        eprintln!("warning: {warning}");
    }
    let topics = Topics::new(&config.agent.resolved_prefix(&config::hostname()));
    println!("{}: ok", path.display());
    println!("prefix: {}", topics.prefix());
    println!(
        "local broker: {}",
        if config.broker.is_some() {
            "yes"
        } else {
            "none"
        }
    );
    match &config.upstream {
        Some(upstream) => {
            let published: Vec<String> = config
                .claims(&topics)
                .into_iter()
                .map(|claim| claim.topic)
                .collect();
            print!("{}", upstream.describe(topics.prefix(), &published));
            println!("store: {}", config.store.path.display());
        }
        None => println!("upstream: none (LAN-only, no store)"),
    }
    println!();
    println!("topics:");
    for claim in config.claims(&topics) {
        println!("  {}", claim.topic);
    }
    let commands = field::describe_commands(&config.field, &topics);
    if !commands.is_empty() {
        println!();
        println!(
            "commands (results on <command>/result; older than {} ms refused):",
            config.agent.command_max_age_ms
        );
        print!("{commands}");
    }
    if !config.field.buses.is_empty() {
        println!();
        print!("{}", field::describe_plans(&config.field));
    }
    let root = fieldbridge::files::effective_uid() == Some(0);
    if root && fieldbridge::files::user(SERVICE_USER).is_some() {
        eprintln!(
            "note: checked as root; the service runs as {SERVICE_USER}: \
             `sudo fieldbridge check-config --as-user {SERVICE_USER}` checks with its rights"
        );
    }
    Ok(())
}

/// The user the systemd unit runs the agent as.
const SERVICE_USER: &str = "fieldbridge";

/// `check-config --as-user USER`: the same check, run by `setpriv` with the user's
/// ids and groups; exits with its status.
fn check_config_as(path: &Path, user: &str) -> anyhow::Result<()> {
    let account = fieldbridge::files::user(user)
        .with_context(|| format!("--as-user {user}: no such user in /etc/passwd"))?;
    if fieldbridge::files::effective_uid() != Some(0) {
        anyhow::bail!(
            "--as-user needs root to take the rights of {user}: \
             sudo fieldbridge check-config --as-user {user}"
        );
    }
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let status = std::process::Command::new("setpriv")
        .arg(format!("--reuid={}", account.uid))
        .arg(format!("--regid={}", account.gid))
        .arg("--init-groups")
        .arg("--")
        .arg(exe)
        .arg("check-config")
        .arg("--config")
        .arg(path)
        .status()
        .context("cannot run setpriv (util-linux) to take the user's rights")?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

fn queue_stats(args: &QueueArgs) -> anyhow::Result<()> {
    let path = match &args.db {
        Some(db) => db.clone(),
        None => {
            let config = config::load(&args.config)?;
            // A [store] section written out names a file worth reading (one left from
            // an earlier upstream, say); without either, the default path means nothing.
            if config.upstream.is_none() && !config.raw.contains_key("store") {
                anyhow::bail!(
                    "{} has no [upstream] section: a LAN-only agent keeps no store, so nothing is queued",
                    args.config.display()
                );
            }
            config.store.path
        }
    };
    if !path.exists() {
        anyhow::bail!(
            "no queue database at {} (the agent creates it when it first runs with an [upstream] section)",
            path.display()
        );
    }
    let stats = store::read_stats(&path)
        .with_context(|| format!("cannot read queue statistics from {}", path.display()))?;
    println!("{}", serde_json::to_string_pretty(&stats)?);
    Ok(())
}

fn passwd(file: &Path, user: &str, batch_password: Option<String>) -> anyhow::Result<()> {
    if user.is_empty() || user.contains(':') {
        anyhow::bail!("user name must be non-empty and must not contain ':'");
    }
    let password = match batch_password {
        Some(password) => password,
        None => read_password()?,
    };
    if password.is_empty() {
        anyhow::bail!("empty password");
    }
    let change = broker::set_password(file, user, &password)?;
    eprintln!(
        "{} user {user} in {}",
        match change {
            broker::PasswdChange::Added => "added",
            broker::PasswdChange::Updated => "updated",
        },
        file.display()
    );
    Ok(())
}

/// One line from stdin; on a terminal, asked twice and not echoed (via `stty`).
fn read_password() -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from standard input")?;
        return Ok(line.trim_end_matches(['\n', '\r']).to_string());
    }
    let stty = |arg: &str| {
        std::process::Command::new("stty")
            .arg(arg)
            .stdin(std::process::Stdio::inherit())
            .status()
    };
    let ask = |prompt: &str| -> anyhow::Result<String> {
        eprint!("{prompt}");
        let _ = std::io::stderr().flush();
        let _ = stty("-echo");
        let mut line = String::new();
        let read = stdin.lock().read_line(&mut line);
        let _ = stty("echo");
        eprintln!();
        read.context("cannot read the password from the terminal")?;
        Ok(line.trim_end_matches(['\n', '\r']).to_string())
    };
    let first = ask("Password: ")?;
    let second = ask("Reenter password: ")?;
    if first != second {
        anyhow::bail!("the passwords do not match; the file is unchanged");
    }
    Ok(first)
}

/// Parses a config-file word (`holding`, `f32`, `CDAB`, `even`) with the same serde
/// names the config file uses.
fn from_name<T: serde::de::DeserializeOwned>(what: &str, name: &str) -> anyhow::Result<T> {
    use serde::de::IntoDeserializer;
    let deserializer: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
        name.into_deserializer();
    T::deserialize(deserializer).map_err(|err| anyhow::anyhow!("--{what} {name:?}: {err}"))
}

fn probe(args: &ProbeArgs) -> anyhow::Result<()> {
    let transport = match (&args.tcp, &args.rtu) {
        (Some(tcp), _) => {
            let (host, port) = match tcp.rsplit_once(':') {
                Some((host, port)) => (
                    host.to_string(),
                    port.parse()
                        .with_context(|| format!("--tcp {tcp:?}: bad port"))?,
                ),
                None => (tcp.clone(), 502),
            };
            field::ProbeTransport::Tcp {
                host,
                port,
                framing: if args.rtu_over_tcp {
                    field::config::Framing::Rtu
                } else {
                    field::config::Framing::Tcp
                },
            }
        }
        (None, Some(port)) => field::ProbeTransport::Rtu {
            port: port.clone(),
            baud: args.baud,
            parity: from_name("parity", &args.parity)?,
            data_bits: args.data_bits,
            stop_bits: args.stop_bits,
        },
        (None, None) => anyhow::bail!("give --tcp HOST[:PORT] or --rtu DEVICE"),
    };
    let choose = match (&args.data_type, &args.order) {
        (Some(data_type), Some(order)) => {
            Some((from_name("type", data_type)?, from_name("order", order)?))
        }
        _ => None,
    };
    let target = field::ProbeTarget {
        transport,
        unit_id: args.unit,
        kind: from_name("kind", &args.kind)?,
        address: args.address,
        count: args.count,
        timeout: std::time::Duration::from_millis(args.timeout_ms),
        expect: args.expect,
        choose,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(field::probe(&target))?;
    print!("{report}");
    Ok(())
}
