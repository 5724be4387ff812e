//! Command-line interface: `crier serve`, `crier publish`, `crier demo`, `crier token`. `crier bench` is
//! added by the binary (src/main.rs): the load tool is a crate of its own (`crier-bench`)
//! that this library does not depend on.

use bytes::Bytes;
use clap::{Parser, Subcommand};

use crate::config::{Config, ServeArgs};
use crate::http_client::HttpClient;
use crate::server::{resolve_config, Server};

#[derive(Parser, Debug)]
#[command(
    name = "crier",
    version,
    about = "Real-time broadcast server: WebSocket and SSE fan-out with live leaderboards",
    after_help = crate::logging::HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server.
    #[command(after_help = crate::logging::HELP)]
    Serve(ServeArgs),
    /// Run the server with a simulated game posting scores, to watch a live board.
    #[command(after_help = crate::logging::HELP)]
    Demo(ServeArgs),
    /// Publish one JSON message to a topic on a running server.
    Publish(PublishArgs),
    /// Print a signed subscriber token (JWT) for private topics, for development.
    Token(crate::auth::mint::TokenArgs),
    /// Check a settings file, or print an example of one.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Check a settings file without starting a server: every error at once, each with its
    /// line; exits non-zero when there is any.
    Check {
        /// The settings file.
        #[arg(env = "CRIER_CONFIG")]
        file: std::path::PathBuf,
    },
    /// Print a commented settings file with every setting at its default.
    Example,
}

#[derive(clap::Args, Debug)]
pub struct PublishArgs {
    /// Topic name.
    pub topic: String,
    /// The message: any JSON value.
    pub json: String,
    /// Server base URL.
    #[arg(long, env = "CRIER_URL", default_value = "http://127.0.0.1:7700")]
    pub url: String,
    /// Publisher key, if the server requires one.
    #[arg(long, env = "CRIER_KEY")]
    pub key: Option<String>,
    /// PEM file of the CA that signed the server's certificate, for an https:// URL with a
    /// private CA; the public web roots are trusted either way.
    #[arg(long, env = "CRIER_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(resolve_config(&args)?, false).await,
        Command::Demo(args) => serve(resolve_config(&args)?, true).await,
        other => {
            crate::logging::init(crate::logging::LogFormat::Text);
            match other {
                Command::Publish(args) => publish(args).await,
                Command::Token(args) => crate::auth::mint::run(&args),
                Command::Config(c) => config_command(c),
                Command::Serve(_) | Command::Demo(_) => unreachable!("matched above"),
            }
        }
    }
}

async fn serve(cfg: Config, demo: bool) -> anyhow::Result<()> {
    crate::logging::init(cfg.log_format);
    if let Some(note) = crate::origin::startup_warning(&cfg) {
        tracing::warn!("{note}");
    }
    let server = Server::start(cfg).await?;
    if demo {
        let state = &server.state;
        crate::leaderboard::demo::spawn(state.boards.clone(), state.shutdown.clone(), server.addr);
    }
    wait_for_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

fn config_command(c: ConfigCommand) -> anyhow::Result<()> {
    match c {
        ConfigCommand::Example => {
            print!("{}", crate::config_example::example());
            Ok(())
        }
        ConfigCommand::Check { file } => {
            let problems = crate::config_check::check(&file)?;
            if problems.is_empty() {
                println!("{}: ok", file.display());
                return Ok(());
            }
            eprint!("{}", crate::config_check::report(&file, &problems));
            anyhow::bail!(
                "{} problem{} in {}",
                problems.len(),
                if problems.len() == 1 { "" } else { "s" },
                file.display()
            )
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    serde_json::from_str::<serde_json::Value>(&args.json)
        .map_err(|e| anyhow::anyhow!("the message is not JSON: {e}"))?;
    let url = format!(
        "{}/api/publish/{}",
        args.url.trim_end_matches('/'),
        args.topic
    );
    let mut client = HttpClient::new(args.key);
    if let Some(ca) = &args.ca_file {
        client = client.with_ca_file(ca)?;
    }
    let (status, body) = client.post(&url, Bytes::from(args.json)).await?;
    let text = String::from_utf8_lossy(&body);
    if status.is_success() {
        println!("{text}");
        Ok(())
    } else {
        anyhow::bail!("{status}: {text}")
    }
}
