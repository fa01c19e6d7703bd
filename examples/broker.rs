//! Runs the built-in broker on its own, for benchmarks and manual tests.
//!
//! Usage: `broker [PORT] [--config FILE]`. Without a config file: one plain listener on
//! 127.0.0.1:PORT (default 1883) with the default limits. Stops on Ctrl-C (or SIGTERM),
//! writing the persistence snapshot if one is configured. `WORKER_THREADS` sets the
//! runtime's threads as `agent.worker_threads` does for the agent: 1 (the default, as
//! the agent's) one thread, 0 one per core, N that many.

use fieldbridge::broker::{Broker, BrokerConfig, ListenerConfig};

fn main() -> anyhow::Result<()> {
    let threads: usize = match std::env::var("WORKER_THREADS") {
        Ok(n) => n.parse()?,
        Err(_) => 1,
    };
    fieldbridge::agent::runtime(threads)?.block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let mut config = BrokerConfig::default();
    while let Some(arg) = args.next() {
        if arg == "--config" {
            let path = args
                .next()
                .ok_or_else(|| anyhow::anyhow!("--config needs a file"))?;
            config = toml::from_str(&std::fs::read_to_string(&path)?)?;
        } else {
            let port: u16 = arg.parse()?;
            config.listeners = vec![ListenerConfig {
                bind: ([127, 0, 0, 1], port).into(),
                tls: None,
            }];
        }
    }
    let broker = Broker::start(config, Vec::new()).await?;
    println!("listening on {:?}", broker.local_addrs());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    broker.shutdown().await;
    Ok(())
}
