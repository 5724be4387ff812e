//! `crier bench`: a load tool for a running server, loopback only. Opens N WebSocket or
//! SSE subscribers (optionally some stalled ones that never read), publishes M messages in
//! a burst or at a steady rate, and reports connect time, deliveries per second, loss,
//! duplicates, out-of-order deliveries and publish-to-receive latency. `--idle` instead
//! holds the connections and reports the server's memory per connection.
//!
//! `--mode scores` and `--mode board` measure the leaderboards instead (see `board`):
//! durable score ingest, and post-to-screen latency of a new leader to N board watchers;
//! `--mode follow` (`follow`) N watchers each following their own player's window.
//! `--mode resume-storm` (`resume`) cuts N subscribers, publishes while they are away and
//! times their resume; `--mode publish-throughput` (`throughput`) counts acknowledged
//! publications per second over one or many topics.
//!
//! `--target A,B,C` runs fanout, publish-throughput and scores against several nodes that
//! share one Redis (issue 8): subscribers spread round robin, publications through one
//! node or round robin (`--publish-via`), latency per node. Latency is always measured
//! publish-to-receive at the client, so it includes the Redis hop the server's own metric
//! leaves out.
//!
//! The tool speaks to the server over the wire only: it depends on `crier-protocol` (the
//! frame codec, names, HTTP client), never on the server library.
//!
//! The subscriber side is deliberately thin (see `subscriber`): the tool and the server
//! usually share the machine, and every cycle the tool spends is one the server lacks.

pub mod attack;
pub mod board;
pub mod envelope;
pub mod follow;
pub mod offsets;
pub mod presence;
pub mod pusher;
pub mod report;
pub mod resume;
pub mod stop;
pub mod subscriber;
pub mod throughput;
pub mod token;

use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, FromArgMatches};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use crier_protocol::http_client::HttpClient;
use offsets::Tally;
use report::{IdleReport, Percentiles, Report, StalledReport};
use subscriber::{Shared, SubResult};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BenchTransport {
    #[default]
    Ws,
    Sse,
}

impl BenchTransport {
    fn name(self) -> &'static str {
        match self {
            BenchTransport::Ws => "ws",
            BenchTransport::Sse => "sse",
        }
    }
}

/// What `crier bench` measures.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BenchMode {
    /// Publish --messages to --topic; N subscribers (deliveries/s, latency, loss).
    #[default]
    Fanout,
    /// Leaderboard ingest: post --messages random scores to --board in batches of --batch
    /// over --publishers connections (durable scores/s, request latency).
    Scores,
    /// Leaderboard post-to-screen: N WebSocket watchers of board:--board; --messages posts,
    /// at --rate per second (default 5), each making a new player the leader (latency from
    /// the POST's answer to each watcher seeing that leader).
    Board,
    /// Resume after a reconnect storm: N subscribers of --topic (--transport ws or sse)
    /// are cut, --messages are published while they are away, then all reconnect at once
    /// with `since` (SSE: Last-Event-ID); time until every one has caught up, and
    /// (--server-pid) peak server RSS.
    ResumeStorm,
    /// Acknowledged HTTP publications per second: --messages over --topics topics with
    /// --concurrency keep-alive publishers.
    PublishThroughput,
    /// N WebSocket members join the presence topic --topic over the --target servers: time
    /// until joined and counted by every server, stats and page latency at N, leave time.
    Presence,
    /// Every player's own rank, live: --board is seeded with --players players, N watchers
    /// each follow their own player (board:--board@pI), --messages scores at --rate per
    /// second (default 1000) on random players; latency from a post's answer to the
    /// player's own window showing it, windows delivered per second, server CPU and RSS
    /// (--server-pid).
    Follow,
    /// Pusher protocol (any Pusher server: crier's /app/{key}, Sockudo, Soketi): N protocol
    /// 7 subscribers of channel --topic, --messages events through the signed HTTP API
    /// (--pusher-app); deliveries/s and latency, or with --idle the server's memory per
    /// connection while held and after they close (--server-pid).
    Pusher,
    /// Pusher HTTP API: acknowledged `POST /apps/{id}/events` per second with --publishers
    /// in flight, delivered to N Pusher subscribers of --topic.
    PusherApi,
}

impl BenchMode {
    fn name(self) -> &'static str {
        match self {
            BenchMode::Fanout => "fanout",
            BenchMode::Scores => "scores",
            BenchMode::Board => "board",
            BenchMode::ResumeStorm => "resume-storm",
            BenchMode::PublishThroughput => "publish-throughput",
            BenchMode::Presence => "presence",
            BenchMode::Follow => "follow",
            BenchMode::Pusher => "pusher",
            BenchMode::PusherApi => "pusher-api",
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// What to measure: fanout (a topic), scores (leaderboard ingest), board (new leader
    /// to board watchers), follow (each watcher's own player's window), resume-storm (N clients resume at once) or publish-throughput
    /// (acknowledged publications/s).
    #[arg(long, value_enum, default_value = "fanout")]
    pub mode: BenchMode,
    /// Same as --mode resume-storm.
    #[arg(long, conflicts_with_all = ["publish_throughput", "mode"])]
    pub resume_storm: bool,
    /// Same as --mode publish-throughput.
    #[arg(long, conflicts_with = "mode")]
    pub publish_throughput: bool,
    /// Topics of --mode publish-throughput and fanout: 1 publishes to --topic, K > 1 round
    /// robin to --topic.0 ..= --topic.(K-1). In fanout (WebSocket or SSE) subscriber i subscribes
    /// to --topic.(i mod K): `--subscribers 10000 --topics 10000` is one subscriber per
    /// topic (the many-topics scenario); with --server-pid the report gives the server's
    /// CPU time per publication.
    #[arg(long, default_value_t = 1)]
    pub topics: usize,
    /// Server base URL; must be a loopback address (127.0.0.0/8, ::1 or localhost).
    /// `https://` makes every subscriber `wss://` (or SSE over HTTPS) and publishes over
    /// HTTPS; the certificate is checked (--ca-file for a private CA).
    #[arg(long, env = "CRIER_URL", default_value = "http://127.0.0.1:7700")]
    pub url: String,
    /// PEM file of CA certificates to trust for an `https://` --url (besides the public
    /// web roots), e.g. the CA of a self-signed loopback test certificate.
    #[arg(long, env = "CRIER_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Several servers (nodes sharing one Redis) instead of --url, comma separated, e.g.
    /// `http://127.0.0.1:7701,http://127.0.0.1:7702`: fanout spreads its subscribers over
    /// them round robin and reports latency per node; publications (and scores) go through
    /// --publish-via. At most 32, loopback only.
    #[arg(long, value_delimiter = ',')]
    pub target: Vec<String>,
    /// Which target publications and scores go through: its index in --target (0 is the
    /// first), or `rr` for round robin over all of them.
    #[arg(long, default_value = "0")]
    pub publish_via: String,
    /// Subscriber transport.
    #[arg(long, value_enum, default_value = "ws")]
    pub transport: BenchTransport,
    /// Healthy subscribers to open.
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Topic to subscribe and publish to (--mode fanout).
    #[arg(long, default_value = "bench")]
    pub topic: String,
    /// Leaderboard for --mode scores and --mode board (created by the first score).
    #[arg(long, default_value = "bench")]
    pub board: String,
    /// Boards of --mode scores: 1 posts to --board, K > 1 round robin to --board.0 ..=
    /// --board.(K-1).
    #[arg(long, default_value_t = 1)]
    pub boards: usize,
    /// Scores per request in --mode scores (1-1000; 1 posts one JSON object per request).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Size of the random player-id pool of --mode scores; in --mode follow, the players
    /// the board is seeded with (p0 ..).
    #[arg(long, default_value_t = 100_000)]
    pub players: u64,
    /// Spread subscriber source addresses over 127.0.0.2 ..= 127.0.0.(K+1), so a large N
    /// does not run one address out of ephemeral ports. 0 lets the kernel choose.
    #[arg(long, default_value_t = 4)]
    pub source_ips: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Publications to send (fanout); scores to post (scores); new leaders to post (board).
    #[arg(long, default_value_t = 1000)]
    pub messages: u64,
    /// Size of each published JSON body, in bytes.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Publications per second; 0 publishes a burst, as fast as the publishers can.
    /// In --mode board: new leaders per second (0 means 5); in --mode follow: scores per
    /// second (0 means 1000).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Concurrent HTTP publishers (connections) in a burst; in-flight cap at a steady rate.
    /// In --mode scores: concurrent score posters (connections); in --mode
    /// publish-throughput: concurrent publishers (keep-alive connections).
    #[arg(long, visible_alias = "concurrency", default_value_t = 4)]
    pub publishers: usize,
    /// Publisher key, if the server requires one.
    #[arg(long, env = "CRIER_KEY")]
    pub key: Option<String>,
    /// Longest wait for connections, and for deliveries after the last publication;
    /// whatever has not arrived by then is reported as lost.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Also open K WebSocket subscribers that never read (small receive buffer), kept out
    /// of the healthy statistics; report how many the server disconnected.
    #[arg(long, default_value_t = 0)]
    pub stalled: usize,
    /// SO_RCVBUF of the stalled subscribers, in bytes.
    #[arg(long, default_value_t = 4096)]
    pub stalled_rcvbuf: u32,
    /// Open the subscribers and hold them for --hold without publishing (memory test).
    #[arg(long)]
    pub idle: bool,
    /// How long --idle holds the connections.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub hold: Duration,
    /// The server's process id: its VmRSS is read before connecting and while holding
    /// (--idle), and sampled for its peak during a --resume-storm.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Run hostile clients of this kind next to the healthy steady-rate load (fanout mode)
    /// and report healthy loss and p99 during the attack, how each attacker ended (close
    /// code, HTTP status, EOF, still open) and, with --server-pid, server RSS growth per
    /// attacker. Attackers start once the healthy subscribers are in and stop when their
    /// deliveries are (so the attack lasts about --messages / --rate). The server refusing
    /// or closing attackers is success; the run fails only on healthy loss or failures.
    #[arg(long, value_enum)]
    pub attack: Option<attack::AttackKind>,
    /// Attacking sockets (1-5000) for --attack.
    #[arg(long, default_value_t = 1)]
    pub attackers: usize,
    /// Attacker source addresses: 127.0.0.9 down to 127.0.0.(10-K), K of 1-4; they must not
    /// overlap the healthy 127.0.0.2 ..= 127.0.0.(1 + --source-ips).
    #[arg(long, default_value_t = 1)]
    pub attack_source_ips: usize,
    /// With --server-pid: stop the attackers early once the server's RSS passes this many
    /// MiB, so an unprotected server cannot exhaust the machine (reported as rss_limit_hit).
    #[arg(long, default_value_t = 4096)]
    pub attack_max_rss_mib: u64,
    /// With --attack: first run the same healthy load without the attack, in this
    /// invocation, and report its latency next to the attacked run's.
    #[arg(long)]
    pub baseline: bool,
    /// A subscriber token every subscriber sends as `?token=` (for a private --topic).
    /// Fanout mode (with or without --idle) only.
    #[arg(long, conflicts_with = "token_secret")]
    pub token: Option<String>,
    /// Mint one HS256 token per subscriber with this secret (the server's jwt_secret):
    /// sub `bench-N`, topics [--topic], exp now + --token-ttl; each is sent as `?token=`.
    /// Fanout mode (with or without --idle) only.
    #[arg(long)]
    pub token_secret: Option<String>,
    /// Lifetime of the tokens of --token-secret.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub token_ttl: Duration,
    /// The Pusher app of --mode pusher and pusher-api: ID:KEY:SECRET.
    #[arg(
        long,
        env = "CRIER_BENCH_PUSHER_APP",
        default_value = "1:app-key:app-secret"
    )]
    pub pusher_app: String,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// No progress bar or progress lines.
    #[arg(long)]
    pub quiet: bool,
}

impl BenchArgs {
    /// Parses `crier bench` flags from a list (for tests and scripts embedding the tool).
    pub fn from_flags<I, T>(flags: I) -> anyhow::Result<Self>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let cmd = <BenchArgs as Args>::augment_args(clap::Command::new("bench"));
        let matches = cmd.try_get_matches_from(
            std::iter::once(std::ffi::OsString::from("bench"))
                .chain(flags.into_iter().map(Into::into)),
        )?;
        Ok(BenchArgs::from_arg_matches(&matches)?)
    }

    /// The base URLs of the run (no trailing slash; `http://` added to a bare host:port):
    /// --target, or --url alone.
    pub fn targets(&self) -> Vec<String> {
        if self.target.is_empty() {
            vec![self.url.trim_end_matches('/').to_string()]
        } else {
            self.target
                .iter()
                .map(|t| {
                    let t = t.trim().trim_end_matches('/');
                    if t.contains("://") {
                        t.to_string()
                    } else {
                        format!("http://{t}")
                    }
                })
                .collect()
        }
    }

    /// The base URLs publications go through, used round robin (one unless `rr`).
    pub fn publish_bases(&self) -> anyhow::Result<Vec<String>> {
        let all = self.targets();
        if self.publish_via == "rr" {
            return Ok(all);
        }
        let i: usize = self
            .publish_via
            .parse()
            .ok()
            .filter(|&i| i < all.len())
            .with_context(|| {
                format!(
                    "--publish-via must be rr or a target index below {}",
                    all.len()
                )
            })?;
        Ok(vec![all[i].clone()])
    }
}

/// `crier bench`: runs, prints the report, and fails (non-zero exit) on connection
/// failures or, outside a stalled run, on any loss, duplicate or out-of-order delivery.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let json = args.json;
    let report = run_with(args).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    let failures = report.failures();
    if !failures.is_empty() {
        bail!("{}", failures.join(", "));
    }
    Ok(())
}

/// The server address of `url` (`http://` or `https://`), refused unless it is loopback.
pub fn loopback_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let (rest, default_port) = if let Some(rest) = url.strip_prefix("http://") {
        (rest, 80)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (rest, 443)
    } else {
        bail!("{url}: only http:// and https:// URLs are supported");
    };
    let authority = rest.split('/').next().unwrap_or("");
    let with_port = if authority.rsplit_once(':').is_some_and(|(h, p)| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':')
    }) {
        authority.to_string()
    } else {
        format!("{authority}:{default_port}")
    };
    let addr = with_port
        .to_socket_addrs()
        .with_context(|| format!("resolving {authority}"))?
        .find(|a| a.ip().is_loopback())
        .with_context(|| {
            format!("{authority} is not a loopback address: bench runs on loopback only")
        })?;
    Ok(addr)
}

/// The subscribers' TLS for `https://` targets (all of them, or none: a run does not mix
/// schemes), checking the certificate against the public roots plus `ca_file`. The name
/// checked is the first target's host.
pub fn tls_target(
    targets: &[String],
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<Option<subscriber::TlsTarget>> {
    let https = targets.iter().filter(|t| t.starts_with("https://")).count();
    if https == 0 {
        anyhow::ensure!(
            ca_file.is_none(),
            "--ca-file needs an https:// --url or --target"
        );
        return Ok(None);
    }
    anyhow::ensure!(
        https == targets.len(),
        "--target mixes http:// and https:// servers"
    );
    let authority = targets[0]["https://".len()..]
        .split('/')
        .next()
        .unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let name = rustls_pki_types::ServerName::try_from(host.to_string())
        .with_context(|| format!("{host}: not a TLS server name"))?;
    let config = crier_protocol::http_client::tls_config(ca_file)?;
    Ok(Some(subscriber::TlsTarget {
        connector: tokio_rustls::TlsConnector::from(config),
        name,
    }))
}

/// The publishers' HTTP client: `--key`, and `--ca-file` for an `https://` server.
pub fn http_client(args: &BenchArgs) -> anyhow::Result<HttpClient> {
    let client = HttpClient::new(args.key.clone());
    match &args.ca_file {
        Some(ca) => client.with_ca_file(ca),
        None => Ok(client),
    }
}

/// Server CPU time, user + system of all its threads, in seconds from /proc/PID/stat
/// (Linux counts it in USER_HZ ticks: 100 a second).
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2, the command name, may hold spaces: count from the `)` that ends it. After it
    // come field 3 (state) onwards, so utime (14) and stime (15) are the 12th and 13th.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    Some((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

/// Server RSS in KiB from /proc/PID/status.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn progress(len: u64, msg: &str, hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_message(msg.to_string());
    pb
}

/// Source addresses 127.0.0.2 ..= 127.0.0.(k+1) for an IPv4 loopback target.
fn sources(addr: SocketAddr, k: usize) -> Vec<IpAddr> {
    if !addr.is_ipv4() {
        return Vec::new();
    }
    (0..k.min(250))
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i as u8)))
        .collect()
}

/// Runs one benchmark and returns its report (also used by the integration tests).
pub async fn run_with(mut args: BenchArgs) -> anyhow::Result<Report> {
    let targets = args.targets();
    anyhow::ensure!(
        (1..=subscriber::HIST_SHARDS).contains(&targets.len()),
        "--target takes 1-{} servers",
        subscriber::HIST_SHARDS
    );
    let target_addrs = targets
        .iter()
        .map(|t| loopback_addr(t))
        .collect::<anyhow::Result<Vec<_>>>()?;
    args.publish_bases()?;
    let tls = tls_target(&targets, args.ca_file.as_deref())?;
    anyhow::ensure!(
        tls.is_none() || args.attack.is_none(),
        "--attack speaks plain TCP: use an http:// --url"
    );
    let addr = target_addrs[0];
    if !args.target.is_empty() {
        args.url = targets[0].clone();
    }
    if args.resume_storm {
        args.mode = BenchMode::ResumeStorm;
    } else if args.publish_throughput {
        args.mode = BenchMode::PublishThroughput;
    }
    anyhow::ensure!(
        args.connect_concurrency >= 1,
        "--connect-concurrency must be at least 1"
    );
    anyhow::ensure!(args.publishers >= 1, "--publishers must be at least 1");
    anyhow::ensure!(
        targets.len() == 1
            || matches!(
                args.mode,
                BenchMode::Fanout
                    | BenchMode::Scores
                    | BenchMode::PublishThroughput
                    | BenchMode::Presence
            ),
        "several --target servers work with fanout, scores, publish-throughput and presence only"
    );
    anyhow::ensure!(
        targets.len() == 1 || (args.attack.is_none() && !args.idle && args.stalled == 0),
        "several --target servers do not combine with --attack, --idle or --stalled"
    );
    anyhow::ensure!(
        args.mode == BenchMode::Fanout || (args.token.is_none() && args.token_secret.is_none()),
        "--token and --token-secret work with --mode fanout only"
    );
    anyhow::ensure!(
        (1..=100_000).contains(&args.topics),
        "--topics must be 1-100000"
    );
    anyhow::ensure!(
        args.topics == 1
            || args.mode != BenchMode::Fanout
            || (args.token.is_none()
                && args.token_secret.is_none()
                && args.attack.is_none()
                && !args.idle),
        "fanout over several --topics takes no --token, --token-secret, --attack or --idle"
    );
    match args.mode {
        BenchMode::Fanout => {}
        BenchMode::Pusher | BenchMode::PusherApi => {
            let mut shared = Shared::new(addr, args.topic.clone(), sources(addr, args.source_ips));
            shared.tls = tls;
            let p = pusher::run(&args, Arc::new(shared), &targets[0]).await?;
            return Ok(Report {
                mode: args.mode.name().to_string(),
                url: args.url.clone(),
                transport: "pusher".to_string(),
                topic: args.topic.clone(),
                subscribers: args.subscribers,
                connected: p.connected,
                connect_failed: p.connect_failed,
                pusher: Some(p),
                ..Default::default()
            });
        }
        BenchMode::Scores | BenchMode::Board | BenchMode::Follow => {
            return run_leaderboard(args, addr, tls).await
        }
        BenchMode::ResumeStorm | BenchMode::PublishThroughput => {
            return run_history(args, addr, tls).await
        }
        BenchMode::Presence => {
            anyhow::ensure!(
                crier_protocol::names::is_valid_topic(&args.topic),
                "--topic must be 1-128 bytes of A-Z a-z 0-9 _ - . :"
            );
            let mut shared = Shared::with_targets(
                target_addrs,
                args.topic.clone(),
                sources(addr, args.source_ips),
            );
            shared.tls = tls;
            let p = presence::run(&args, Arc::new(shared), targets.clone()).await?;
            return Ok(Report {
                mode: args.mode.name().to_string(),
                url: args.url.clone(),
                targets: if targets.len() > 1 {
                    targets
                } else {
                    Vec::new()
                },
                transport: "ws".to_string(),
                topic: args.topic.clone(),
                subscribers: args.subscribers,
                connected: args.subscribers - p.connect_failed,
                connect_failed: p.connect_failed,
                presence: Some(p),
                ..Default::default()
            });
        }
    }
    anyhow::ensure!(
        crier_protocol::names::is_valid_topic(&args.topic),
        "--topic must be 1-128 bytes of A-Z a-z 0-9 _ - . : @"
    );
    let attack_plan = match args.attack {
        Some(kind) => Some(attack::plan(&args, kind)?),
        None => None,
    };
    // The healthy load alone first, so the attacked figures compare within one invocation.
    let baseline = if attack_plan.is_some() && args.baseline {
        let mut base = args.clone();
        base.attack = None;
        base.baseline = false;
        Some(Box::pin(run_with(base)).await.context("baseline run")?)
    } else {
        None
    };
    let hidden = args.quiet || args.json || !std::io::stderr().is_terminal();
    let mut shared = Shared::with_targets(
        target_addrs,
        args.topic.clone(),
        sources(addr, args.source_ips),
    );
    shared.tokens = match (&args.token, &args.token_secret) {
        (Some(t), _) => Some(token::Tokens::Fixed(t.clone())),
        (None, Some(secret)) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .context("clock before 1970")?;
            Some(token::Tokens::minted(
                secret,
                &args.topic,
                (now + args.token_ttl).as_secs(),
                args.subscribers + args.stalled + 1,
            ))
        }
        (None, None) => None,
    };
    shared.tls = tls;
    shared.topics = args.topics;
    let shared = Arc::new(shared);
    let mut report = Report {
        mode: args.mode.name().to_string(),
        url: args.url.clone(),
        targets: if targets.len() > 1 {
            targets.clone()
        } else {
            Vec::new()
        },
        publish_via: args.publish_via.clone(),
        transport: args.transport.name().to_string(),
        topic: args.topic.clone(),
        tokens: match (&args.token, &args.token_secret) {
            (Some(_), _) => "fixed",
            (None, Some(_)) => "minted",
            (None, None) => "none",
        }
        .to_string(),
        subscribers: args.subscribers,
        messages: if args.idle { 0 } else { args.messages },
        payload_bytes: args.payload,
        rate: args.rate,
        ..Default::default()
    };
    let rss_before = args.server_pid.and_then(rss_kib);

    // SSE has no `subscribed` reply: learn the topic's offset from a WebSocket first
    // (nothing is published while subscribers connect, so it is everyone's start).
    let sse_starts = Arc::new(if args.transport == BenchTransport::Sse {
        subscriber::sse_starts(&shared, args.connect_concurrency).await?
    } else {
        Vec::new()
    });

    // Connect the healthy subscribers.
    let sem = Arc::new(Semaphore::new(args.connect_concurrency));
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Result<Duration, String>)>();
    let mut subs: JoinSet<(usize, bool, SubResult)> = JoinSet::new();
    let connect_start = Instant::now();
    for i in 0..args.subscribers {
        let (shared, sem, tx) = (shared.clone(), sem.clone(), tx.clone());
        let transport = args.transport;
        let sse_start = sse_starts.get(i % args.topics).copied().unwrap_or(0);
        subs.spawn(async move {
            let permit = sem.acquire_owned().await.expect("semaphore open");
            let t0 = Instant::now();
            match transport {
                BenchTransport::Ws => match subscriber::ws_open(&shared, i, None).await {
                    Ok((stream, decoder, start)) => {
                        drop(permit);
                        let _ = tx.send((i, Ok(t0.elapsed())));
                        (
                            i,
                            true,
                            subscriber::ws_run(stream, decoder, start, shared, i).await,
                        )
                    }
                    Err(e) => {
                        let _ = tx.send((i, Err(format!("{e:#}"))));
                        (i, false, SubResult::default())
                    }
                },
                BenchTransport::Sse => match subscriber::sse_open(&shared, i).await {
                    Ok((stream, chunked, first)) => {
                        drop(permit);
                        let _ = tx.send((i, Ok(t0.elapsed())));
                        let r =
                            subscriber::sse_run(stream, chunked, first, sse_start, shared, i).await;
                        (i, true, r)
                    }
                    Err(e) => {
                        let _ = tx.send((i, Err(format!("{e:#}"))));
                        (i, false, SubResult::default())
                    }
                },
            }
        });
    }
    drop(tx);
    let pb = progress(args.subscribers as u64, "connect", hidden);
    let mut connect_hist = subscriber::new_histogram();
    let connect_deadline = tokio::time::Instant::now() + args.timeout;
    let mut outcomes = 0;
    // Subscribers in place per topic, for the deliveries to expect.
    let mut in_place = vec![0u64; args.topics];
    while outcomes < args.subscribers {
        match tokio::time::timeout_at(connect_deadline, rx.recv()).await {
            Ok(Some((i, Ok(d)))) => {
                in_place[i % args.topics] += 1;
                report.connected += 1;
                connect_hist.saturating_record(d.as_micros().max(1) as u64);
            }
            Ok(Some((_, Err(e)))) => {
                report.connect_failed += 1;
                report.first_connect_error.get_or_insert(e);
            }
            Ok(None) => break,
            Err(_) => {
                report.first_connect_error.get_or_insert_with(|| {
                    format!("connect phase timed out after {:?}", args.timeout)
                });
                break;
            }
        }
        outcomes += 1;
        pb.set_position(outcomes as u64);
    }
    report.connect_failed = args.subscribers - report.connected;
    report.connect_total_ms = connect_start.elapsed().as_secs_f64() * 1000.0;
    report.connect_ms = Percentiles::from_us(&connect_hist);
    pb.finish_and_clear();

    // Stalled subscribers: WebSocket, tiny receive buffer, never read after `subscribed`.
    let mut stalled: Vec<subscriber::Conn> = Vec::new();
    let mut stalled_failed = 0;
    if args.stalled > 0 {
        let mut set = JoinSet::new();
        for i in 0..args.stalled {
            let (shared, sem, rcvbuf) = (shared.clone(), sem.clone(), args.stalled_rcvbuf);
            set.spawn(async move {
                let _permit = sem.acquire_owned().await.expect("semaphore open");
                subscriber::ws_open(&shared, args.subscribers + i, Some(rcvbuf)).await
            });
        }
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok((stream, _, _))) => stalled.push(stream),
                Ok(Err(e)) => {
                    stalled_failed += 1;
                    report
                        .first_connect_error
                        .get_or_insert(format!("stalled subscriber: {e:#}"));
                }
                Err(e) => {
                    stalled_failed += 1;
                    report.first_connect_error.get_or_insert(e.to_string());
                }
            }
        }
        report.connect_failed += stalled_failed;
    }

    if args.idle {
        report.idle =
            Some(hold_idle(&args, rss_before, report.connected + stalled.len(), hidden).await);
        shared.stop.cancel();
        while subs.join_next().await.is_some() {}
        return Ok(report);
    }

    // Attackers go in once the healthy subscribers are in place.
    let attack = match attack_plan {
        Some(plan) => Some(attack::start(plan, addr).await?),
        None => None,
    };

    // Publish, and wait for the deliveries.
    let published_ok = Arc::new(AtomicU64::new(0));
    let publish_start = Instant::now();
    let cpu_before = args.server_pid.and_then(cpu_secs);
    let client = http_client(&args)?;
    let publish_urls = args
        .publish_bases()?
        .iter()
        .flat_map(|b| {
            // Ordered so publication seq goes to topic seq mod K (see `publish`).
            let (topic, k) = (&args.topic, args.topics);
            (0..k).map(move |t| format!("{b}/api/publish/{}", subscriber::topic_name(topic, k, t)))
        })
        .collect();
    let pub_task = tokio::spawn(publish(
        client,
        publish_urls,
        args.messages,
        args.payload,
        args.rate,
        args.publishers,
        published_ok.clone(),
    ));
    let total_hint =
        args.messages * report.connected as u64 / args.topics.min(report.connected.max(1)) as u64;
    let pb = progress(total_hint, "deliveries", hidden);
    let mut pub_task = Some(pub_task);
    let mut published: Option<PublishOutcome> = None;
    let mut delivery_deadline: Option<Instant> = None;
    loop {
        let delivered = shared.delivered.load(Ordering::Relaxed);
        pb.set_position(delivered);
        if let Some(p) = &published {
            let expected: u64 = (0..args.topics)
                .map(|t| in_place[t] * subscriber::per_topic(p.ok, args.topics, t))
                .sum();
            if delivered >= expected {
                break;
            }
            if delivery_deadline.is_some_and(|d| Instant::now() >= d) {
                report.timed_out = true;
                break;
            }
        }
        if let Some(task) = pub_task.as_mut() {
            if task.is_finished() {
                let outcome = pub_task.take().expect("task").await?;
                delivery_deadline = Some(Instant::now() + args.timeout);
                published = Some(outcome);
                continue;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    pb.finish_and_clear();
    let mut server_cpu_secs = None;
    if let Some((b, a)) = cpu_before.zip(args.server_pid.and_then(cpu_secs)) {
        report.server_cpu_cores = Some((a - b) / publish_start.elapsed().as_secs_f64().max(1e-9));
        server_cpu_secs = Some(a - b);
    }
    if let Some(a) = attack {
        report.attack = Some(a.finish().await);
    }
    let published = published.expect("publishing finished");
    report.published = published.ok;
    report.publish_errors = published.failed;
    report.first_publish_error = published.first_error;
    report.publish_secs = published.elapsed.as_secs_f64();
    report.topics = args.topics;
    report.server_cpu_us_per_publication = server_cpu_secs
        .filter(|_| published.ok > 0)
        .map(|s| s * 1e6 / published.ok as f64);

    shared.stop.cancel();
    let mut tally = Tally::default();
    let mut last_rx: Option<Instant> = None;
    while let Some(r) = subs.join_next().await {
        let (i, connected, r) = r.context("subscriber task panicked")?;
        // Subscribers that failed to connect are reported as failed connections, not loss.
        if !connected {
            continue;
        }
        last_rx = last_rx.max(r.last_rx);
        if r.closed {
            report.subscribers_closed += 1;
        }
        let t = i % args.topics;
        tally += r
            .tracker
            .tally(subscriber::per_topic(published.ok, args.topics, t));
    }
    report.apply_tally(&tally);
    let elapsed = last_rx.map_or(Duration::ZERO, |t| {
        t.saturating_duration_since(publish_start)
    });
    report.delivery_secs = elapsed.as_secs_f64();
    report.deliveries_per_sec = report::rate_per_sec(report.received_deliveries, elapsed);
    let latency: Histogram<u64> = shared.merged_latency();
    report.latency_ms = Percentiles::from_us(&latency);
    if targets.len() > 1 {
        report.per_target = (0..targets.len())
            .map(|t| report::TargetReport {
                url: targets[t].clone(),
                subscribers: args.subscribers / targets.len()
                    + usize::from(t < args.subscribers % targets.len()),
                latency_ms: Percentiles::from_us(&shared.target_latency(t)),
            })
            .collect();
    }
    if let (Some(a), Some(base)) = (report.attack.as_mut(), baseline.as_ref()) {
        a.compare_with(base, report.latency_ms.p99);
    }

    if args.stalled > 0 {
        let mut st = StalledReport {
            opened: stalled.len(),
            ..Default::default()
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut checks = JoinSet::new();
        for s in stalled {
            checks.spawn(subscriber::stalled_check(
                s,
                Duration::from_secs(3),
                deadline,
            ));
        }
        while let Some(r) = checks.join_next().await {
            if let Ok((closed, code)) = r {
                if closed {
                    st.disconnected += 1;
                }
                if let Some(c) = code {
                    if !st.close_codes.contains(&c) {
                        st.close_codes.push(c);
                    }
                }
            }
        }
        report.stalled = Some(st);
    }
    Ok(report)
}

/// `--mode scores` and `--mode board`.
async fn run_leaderboard(
    args: BenchArgs,
    addr: SocketAddr,
    tls: Option<subscriber::TlsTarget>,
) -> anyhow::Result<Report> {
    anyhow::ensure!(
        crier_protocol::names::is_valid_board(&args.board),
        "--board must be 1-64 bytes of A-Z a-z 0-9 _ - ."
    );
    let mut report = Report {
        mode: args.mode.name().to_string(),
        url: args.url.clone(),
        transport: "ws".to_string(),
        topic: format!("board:{}", args.board),
        messages: args.messages,
        rate: args.rate,
        ..Default::default()
    };
    match args.mode {
        BenchMode::Scores => {
            report.transport = "http".to_string();
            report.scores = Some(board::run_scores(&args).await?);
        }
        BenchMode::Board => {
            report.subscribers = args.subscribers;
            let mut shared =
                Shared::new(addr, report.topic.clone(), sources(addr, args.source_ips));
            shared.tls = tls;
            let shared = Arc::new(shared);
            report.board = Some(board::run_board(&args, shared, &mut report).await?);
        }
        BenchMode::Follow => {
            report.subscribers = args.subscribers;
            let mut shared =
                Shared::new(addr, report.topic.clone(), sources(addr, args.source_ips));
            shared.tls = tls;
            shared.follow = true;
            let shared = Arc::new(shared);
            report.follow = Some(follow::run(&args, shared, &mut report).await?);
        }
        _ => unreachable!("handled by run_with"),
    }
    Ok(report)
}

/// `--mode resume-storm` and `--mode publish-throughput` (issue 7).
async fn run_history(
    args: BenchArgs,
    addr: SocketAddr,
    tls: Option<subscriber::TlsTarget>,
) -> anyhow::Result<Report> {
    anyhow::ensure!(
        crier_protocol::names::is_valid_topic(&args.topic),
        "--topic must be 1-128 bytes of A-Z a-z 0-9 _ - . : @"
    );
    let hidden = args.quiet || args.json || !std::io::stderr().is_terminal();
    let mut report = Report {
        mode: args.mode.name().to_string(),
        url: args.url.clone(),
        transport: "ws".to_string(),
        topic: args.topic.clone(),
        messages: args.messages,
        payload_bytes: args.payload,
        ..Default::default()
    };
    match args.mode {
        BenchMode::ResumeStorm => {
            report.transport = args.transport.name().to_string();
            report.subscribers = args.subscribers;
            let mut shared = Shared::new(addr, args.topic.clone(), sources(addr, args.source_ips));
            shared.tls = tls;
            let shared = Arc::new(shared);
            report.resume = Some(resume::run(&args, shared, hidden).await?);
        }
        BenchMode::PublishThroughput => {
            report.transport = "http".to_string();
            report.throughput = Some(throughput::run(&args).await?);
        }
        _ => unreachable!("handled by run_with"),
    }
    Ok(report)
}

async fn hold_idle(
    args: &BenchArgs,
    before: Option<u64>,
    conns: usize,
    hidden: bool,
) -> IdleReport {
    let start = Instant::now();
    let mut after = None;
    while start.elapsed() < args.hold {
        let step = (args.hold - start.elapsed()).min(Duration::from_secs(2));
        tokio::time::sleep(step).await;
        if let Some(pid) = args.server_pid {
            after = rss_kib(pid).or(after);
            if !hidden {
                eprintln!(
                    "idle {:>4.0} s: {conns} connections, server VmRSS {} KiB",
                    start.elapsed().as_secs_f64(),
                    after.map_or("-".to_string(), |v| v.to_string())
                );
            }
        }
    }
    IdleReport {
        hold_secs: args.hold.as_secs_f64(),
        rss_before_kib: before,
        rss_after_kib: after,
        bytes_per_connection: match (before, after) {
            (Some(b), Some(a)) => report::bytes_per_connection(b, a, conns),
            _ => None,
        },
    }
}

struct PublishOutcome {
    ok: u64,
    failed: u64,
    first_error: Option<String>,
    elapsed: Duration,
}

/// Publishes `messages` bodies: a burst over `publishers` connections, or one every
/// 1/rate seconds (at most 4 x `publishers` in flight; beyond that, ticks wait).
/// Publication `seq` goes to `urls[seq % n]`: with K topics and B bases the URLs are
/// ordered topic-major per base, so `seq % K` is its topic and bases take turns.
async fn publish(
    client: HttpClient,
    urls: Vec<String>,
    messages: u64,
    size: usize,
    rate: f64,
    publishers: usize,
    ok_count: Arc<AtomicU64>,
) -> PublishOutcome {
    let start = Instant::now();
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(parking_lot::Mutex::new(None::<String>));
    let one = {
        let (client, all, failed, first_error, ok_count) = (
            client.clone(),
            Arc::new(urls),
            failed.clone(),
            first_error.clone(),
            ok_count.clone(),
        );
        move |seq: u64| {
            let (client, urls, failed, first_error, ok_count) = (
                client.clone(),
                all.clone(),
                failed.clone(),
                first_error.clone(),
                ok_count.clone(),
            );
            async move {
                let url = &urls[(seq % urls.len() as u64) as usize];
                let body = envelope::payload(seq, subscriber::unix_us(), size);
                let r = tokio::time::timeout(Duration::from_secs(10), client.post(url, body)).await;
                let err = match r {
                    Ok(Ok((status, _))) if status.is_success() => None,
                    Ok(Ok((status, body))) => {
                        Some(format!("{status}: {}", String::from_utf8_lossy(&body)))
                    }
                    Ok(Err(e)) => Some(format!("{e:#}")),
                    Err(_) => Some("publish timed out after 10 s".to_string()),
                };
                match err {
                    None => {
                        ok_count.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().get_or_insert(e);
                    }
                }
            }
        }
    };
    if rate <= 0.0 {
        let next = Arc::new(AtomicU64::new(0));
        let mut set = JoinSet::new();
        for _ in 0..publishers {
            let (next, one) = (next.clone(), one.clone());
            set.spawn(async move {
                loop {
                    let seq = next.fetch_add(1, Ordering::Relaxed);
                    if seq >= messages {
                        break;
                    }
                    one(seq).await;
                }
            });
        }
        while set.join_next().await.is_some() {}
    } else {
        let period = Duration::from_secs_f64(1.0 / rate);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let inflight = Arc::new(Semaphore::new(publishers.max(1) * 4));
        let mut set = JoinSet::new();
        for seq in 0..messages {
            tick.tick().await;
            let permit = inflight.clone().acquire_owned().await.expect("open");
            let one = one.clone();
            set.spawn(async move {
                one(seq).await;
                drop(permit);
            });
        }
        while set.join_next().await.is_some() {}
    }
    let failed_n = failed.load(Ordering::Relaxed);
    let first = first_error.lock().take();
    PublishOutcome {
        ok: ok_count.load(Ordering::Relaxed),
        failed: failed_n,
        first_error: first,
        elapsed: start.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_from_proc() {
        let before = cpu_secs(std::process::id()).expect("/proc/self/stat");
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let after = cpu_secs(std::process::id()).unwrap();
        assert!(after >= before && before >= 0.0, "{before} -> {after}");
        assert_eq!(cpu_secs(u32::MAX), None);
    }

    #[test]
    fn loopback_only() {
        assert_eq!(
            loopback_addr("http://127.0.0.1:7700").unwrap(),
            "127.0.0.1:7700".parse().unwrap()
        );
        assert_eq!(loopback_addr("http://127.0.0.1").unwrap().port(), 80);
        assert!(loopback_addr("http://localhost:7700/")
            .unwrap()
            .ip()
            .is_loopback());
        assert!(loopback_addr("http://10.0.0.1:7700").is_err());
        assert_eq!(
            loopback_addr("https://127.0.0.1:7700").unwrap(),
            loopback_addr("http://127.0.0.1:7700").unwrap()
        );
        assert_eq!(loopback_addr("https://localhost/").unwrap().port(), 443);
        assert!(loopback_addr("ftp://127.0.0.1:7700").is_err());
    }

    #[test]
    fn flags_parse_with_defaults() {
        let a = BenchArgs::from_flags(["--subscribers", "5", "--transport", "sse"]).unwrap();
        assert_eq!(a.subscribers, 5);
        assert_eq!(a.transport, BenchTransport::Sse);
        assert_eq!(a.connect_concurrency, 256);
        assert_eq!(a.timeout, Duration::from_secs(60));
        assert_eq!(sources("127.0.0.1:1".parse().unwrap(), 2).len(), 2);
        assert_eq!(a.mode, BenchMode::Fanout);
        let b = BenchArgs::from_flags(["--mode", "scores", "--batch", "100"]).unwrap();
        assert_eq!(
            (b.mode, b.batch, b.players),
            (BenchMode::Scores, 100, 100_000)
        );
        assert_eq!(b.board, "bench");
        let c = BenchArgs::from_flags(["--mode", "board", "--board", "x"]).unwrap();
        assert_eq!((c.mode, c.board.as_str()), (BenchMode::Board, "x"));
        let d = BenchArgs::from_flags(["--resume-storm", "--messages", "100"]).unwrap();
        assert!(d.resume_storm && !d.publish_throughput);
        let e = BenchArgs::from_flags([
            "--publish-throughput",
            "--topics",
            "1000",
            "--concurrency",
            "64",
        ])
        .unwrap();
        assert_eq!((e.topics, e.publishers), (1000, 64));
        assert_eq!(
            BenchArgs::from_flags(["--mode", "publish-throughput"])
                .unwrap()
                .mode,
            BenchMode::PublishThroughput
        );
        assert!(BenchArgs::from_flags(["--resume-storm", "--publish-throughput"]).is_err());
        assert!(BenchArgs::from_flags(["--resume-storm", "--mode", "board"]).is_err());
        assert!(BenchArgs::from_flags(["--publish-throughput", "--mode", "fanout"]).is_err());
        let m = BenchArgs::from_flags([
            "--target",
            "http://127.0.0.1:1/,127.0.0.1:2",
            "--publish-via",
            "rr",
        ])
        .unwrap();
        assert_eq!(
            m.targets(),
            vec!["http://127.0.0.1:1", "http://127.0.0.1:2"]
        );
        assert_eq!(m.publish_bases().unwrap().len(), 2);
        let one = BenchArgs::from_flags([
            "--target",
            "http://127.0.0.1:1,http://127.0.0.1:2",
            "--publish-via",
            "1",
        ])
        .unwrap();
        assert_eq!(one.publish_bases().unwrap(), vec!["http://127.0.0.1:2"]);
        for bad in ["2", "x", ""] {
            let b = BenchArgs::from_flags([
                "--target",
                "http://127.0.0.1:1,http://127.0.0.1:2",
                "--publish-via",
                bad,
            ])
            .unwrap();
            assert!(b.publish_bases().is_err(), "{bad}");
        }
        assert_eq!(a.targets(), vec!["http://127.0.0.1:7700"]);
        assert_eq!(a.boards, 1);
    }
}
