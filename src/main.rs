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
    /// Validate a configuration file, then print the devices, read plans and topics.
    CheckConfig {
        /// Configuration file.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
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
    /// from standard input (one line; not echoed on a terminal).
    Passwd {
        /// Password file; created if missing.
        file: PathBuf,
        /// User name.
        user: String,
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
        Command::CheckConfig { config } => check_config(&config),
        Command::Passwd { file, user } => passwd(&file, &user),
        Command::Probe(args) => probe(&args),
        Command::Queue {
            command: QueueCommand::Stats(args),
        } => queue_stats(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", each_cause_once(&err));
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

/// The error and its causes, `outer: inner: …`, each said once. Many errors below the
/// binary put their cause in their own message and also return it as `source()`, so
/// anyhow's `{:#}` repeats it; a cause that the text so far already ends with is left
/// out.
fn each_cause_once(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let cause = cause.to_string();
        if text.ends_with(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

/// Logs to stderr; under systemd (JOURNAL_STREAM set) without timestamps or colours,
/// since the journal stamps every line itself. `RUST_LOG` overrides `level`.
fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().with_ansi(false).init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run(path: &Path) -> anyhow::Result<()> {
    let config = config::load(path)?;
    init_logging(&config.agent.log_level);
    tracing::info!(config = %path.display(), "starting");
    runtime()?.block_on(agent::run(config, Some(path.to_path_buf())))?;
    Ok(())
}

fn demo(upstream: Option<String>, port: u16) -> anyhow::Result<()> {
    init_logging("info");
    runtime()?.block_on(agent::demo::run(upstream, port))?;
    Ok(())
}

fn check_config(path: &Path) -> anyhow::Result<()> {
    let config = config::load(path)?;
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
            println!("upstream: {}", upstream.url);
            println!("store: {}", config.store.path.display());
        }
        None => println!("upstream: none (LAN-only, no store)"),
    }
    println!();
    println!("topics:");
    println!("  {}", topics.status());
    println!("  {}", topics.health());
    for bus in &config.field.buses {
        for device in &bus.devices {
            let profile = device
                .profile
                .as_ref()
                .and_then(|name| config.field.profiles.get(name))
                .map(|profile| profile.points.as_slice())
                .unwrap_or_default();
            println!("  {}", topics.device_status(&device.name));
            if device.batch {
                println!("  {}", topics.device_batch(&device.name));
            }
            for point in profile.iter().chain(&device.points) {
                let topic = topics.point(&device.name, &point.name, point.topic.as_deref());
                println!("  {topic}");
            }
        }
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

fn passwd(file: &Path, user: &str) -> anyhow::Result<()> {
    if user.is_empty() || user.contains(':') {
        anyhow::bail!("user name must be non-empty and must not contain ':'");
    }
    let password = read_password()?;
    if password.is_empty() {
        anyhow::bail!("empty password");
    }
    let line = broker::passwd_line(user, &password);
    let existing = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", file.display())),
    };
    let mut replaced = false;
    let mut out = String::new();
    for existing_line in existing.lines() {
        if existing_line.split(':').next() == Some(user) {
            out.push_str(&line);
            replaced = true;
        } else {
            out.push_str(existing_line);
        }
        out.push('\n');
    }
    if !replaced {
        out.push_str(&line);
        out.push('\n');
    }
    write_private(file, &out).with_context(|| format!("cannot write {}", file.display()))?;
    eprintln!(
        "{} user {user} in {}",
        if replaced { "updated" } else { "added" },
        file.display()
    );
    Ok(())
}

/// Writes through a temporary file and a rename, with mode 0600 like mosquitto_passwd.
fn write_private(file: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = file.with_extension("tmp");
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    out.write_all(text.as_bytes())?;
    out.sync_all()?;
    std::fs::rename(&tmp, file)
}

/// One line from stdin; on a terminal, prompted and not echoed (via `stty`).
fn read_password() -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    let terminal = stdin.is_terminal();
    let stty = |arg: &str| {
        std::process::Command::new("stty")
            .arg(arg)
            .stdin(std::process::Stdio::inherit())
            .status()
    };
    if terminal {
        eprint!("Password: ");
        let _ = std::io::stderr().flush();
        let _ = stty("-echo");
    }
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if terminal {
        let _ = stty("echo");
        eprintln!();
    }
    read.context("cannot read the password from standard input")?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
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
