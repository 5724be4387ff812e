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
    /// Copy a running node's durable files (boards, durable history) into a directory,
    /// consistent as of the request, without stopping the node (docs/operations.md).
    Backup(BackupArgs),
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

#[derive(clap::Args, Debug)]
pub struct BackupArgs {
    /// The directory to write the files into (created if missing; files already there
    /// are never overwritten).
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Server base URL.
    #[arg(long, env = "CRIER_URL", default_value = "http://127.0.0.1:7700")]
    pub url: String,
    /// A publisher key (flat, or a `[[key]]` with `admin = true`): backups always need one.
    #[arg(long, env = "CRIER_KEY")]
    pub key: Option<String>,
    /// PEM file of the CA that signed the server's certificate (https:// with a private CA).
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
                Command::Backup(args) => backup(args).await,
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

/// Fetches every durable file of the node (`GET /api/backup`, then each file) into
/// `--out`, each written to `<name>.partial`, synced, then renamed: a file named
/// `crier.redb` in the directory is always a whole copy.
async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let base = args.url.trim_end_matches('/');
    let mut client = HttpClient::new(args.key);
    if let Some(ca) = &args.ca_file {
        client = client.with_ca_file(ca)?;
    }
    let (status, body) = client.get(&format!("{base}/api/backup")).await?;
    if !status.is_success() {
        anyhow::bail!("{status}: {}", String::from_utf8_lossy(&body));
    }
    #[derive(serde::Deserialize)]
    struct Files {
        files: Vec<String>,
    }
    let files: Files = serde_json::from_slice(&body).context("the file list")?;
    if files.files.is_empty() {
        println!(
            "the node keeps no durable files (under --redis the state is in Redis: back up Redis)"
        );
        return Ok(());
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    for name in &files.files {
        anyhow::ensure!(
            !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\']),
            "the server named an unexpected file {name:?}"
        );
        let dest = args.out.join(name);
        anyhow::ensure!(
            !dest.exists(),
            "{} exists: back up into an empty directory",
            dest.display()
        );
        let partial = args.out.join(format!("{name}.partial"));
        let mut f = std::fs::File::create(&partial)
            .with_context(|| format!("creating {}", partial.display()))?;
        let got = client
            .get_each(&format!("{base}/api/backup/{name}"), |chunk| {
                f.write_all(chunk)
            })
            .await;
        let n = match got.and_then(|n| f.sync_all().map(|_| n).map_err(Into::into)) {
            Ok(n) => n,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(e.context(format!("copying {name}")));
            }
        };
        drop(f);
        std::fs::rename(&partial, &dest)
            .with_context(|| format!("renaming {}", partial.display()))?;
        println!("{}: {n} bytes", dest.display());
    }
    // The renames reach the disk too.
    std::fs::File::open(&args.out)?.sync_all()?;
    Ok(())
}
