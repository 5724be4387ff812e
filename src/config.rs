//! Server settings. Each one has a flag, a `CRIER_*` variable and a key in the optional TOML
//! file; precedence is flag > variable > file > built-in default. clap reads flags and
//! variables (so `--help` lists both), serde reads the file, and `Config::resolve` merges.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::Deserialize;

/// Options of `crier serve`. Every field is optional here so the merge can tell "not given"
/// from "given as the default"; the defaults live in `Config::default`.
#[derive(Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (keys are the long flag names with `_`).
    #[arg(long, env = "CRIER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7700].
    #[arg(long, env = "CRIER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Folder for durable data (leaderboards) [default: ./crier-data].
    #[arg(long, env = "CRIER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Publisher key; repeat or comma-separate for several. When any is set, publishing and
    /// score posting need `Authorization: Bearer <key>` [default: none, publishing is open].
    #[arg(
        long = "publisher-key",
        env = "CRIER_PUBLISHER_KEYS",
        value_delimiter = ','
    )]
    pub publisher_keys: Option<Vec<String>>,
    /// Another site whose pages may open WebSockets and SSE streams and write here (e.g.
    /// https://game.example); repeatable [default: none].
    #[arg(
        long = "allowed-origin",
        env = "CRIER_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Option<Vec<String>>,
    /// Origin browsers use to reach this service (e.g. https://crier.example); repeatable.
    /// Needed behind a domain name: unlisted, only pages served from an IP address or
    /// localhost count as same-origin, which is what stops DNS rebinding [default: none].
    #[arg(
        long = "public-origin",
        env = "CRIER_PUBLIC_ORIGINS",
        value_delimiter = ','
    )]
    pub public_origins: Option<Vec<String>>,
    /// Most subscriber connections (WebSocket + SSE) held at once [default: 16384].
    #[arg(long, env = "CRIER_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most topics tracked by the node; idle topics are evicted past it [default: 100000].
    #[arg(long, env = "CRIER_MAX_TOPICS")]
    pub max_topics: Option<usize>,
    /// Most topics that exist only because clients subscribed to them (never published to);
    /// the rest of max_topics stays free for topics that are published to
    /// [default: half of max_topics, 50000].
    #[arg(long, env = "CRIER_MAX_SUBSCRIBER_TOPICS")]
    pub max_subscriber_topics: Option<usize>,
    /// Most topics one connection may subscribe to [default: 64].
    #[arg(long, env = "CRIER_MAX_TOPICS_PER_CONNECTION")]
    pub max_topics_per_connection: Option<usize>,
    /// Largest published body or client message, in bytes [default: 65536].
    #[arg(long, env = "CRIER_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Bytes a client may have queued and unsent before it is disconnected as a slow
    /// consumer (close 4001) [default: 1048576].
    #[arg(long, env = "CRIER_QUEUE_MAX_BYTES")]
    pub queue_max_bytes: Option<usize>,
    /// How often to ping WebSocket clients and send SSE heartbeats [default: 25s].
    #[arg(long, env = "CRIER_PING_INTERVAL", value_parser = humantime::parse_duration)]
    pub ping_interval: Option<Duration>,
    /// How long a pinged client may stay silent before it is closed (4002) [default: 10s].
    #[arg(long, env = "CRIER_PONG_TIMEOUT", value_parser = humantime::parse_duration)]
    pub pong_timeout: Option<Duration>,
    /// How long a socket write may make no progress before the client is closed (4003)
    /// [default: 10s].
    #[arg(long, env = "CRIER_WRITE_TIMEOUT", value_parser = humantime::parse_duration)]
    pub write_timeout: Option<Duration>,
    /// On shutdown, how long to let clients drain their queues [default: 5s].
    #[arg(long, env = "CRIER_DRAIN_TIMEOUT", value_parser = humantime::parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// Commands (and pings) one WebSocket connection may send per second, with bursts of
    /// twice as many; past it the client gets an error frame and close 4500 [default: 100].
    #[arg(long, env = "CRIER_MAX_COMMANDS_PER_SECOND")]
    pub max_commands_per_second: Option<u32>,
    /// Serve `/echo`, a WebSocket that echoes every message: for conformance testing
    /// (Autobahn) only, never in production [default: off].
    #[arg(long, env = "CRIER_ECHO_ENDPOINT", num_args = 0..=1, default_missing_value = "true")]
    pub echo_endpoint: Option<bool>,
    /// Leaderboard watchers see at most this many top entries unless a board sets
    /// fewer [default: 10].
    #[arg(long, env = "CRIER_BOARD_TOP")]
    pub board_top: Option<usize>,
    /// Shortest gap between two live updates of one board; bursts within it coalesce
    /// [default: 50ms].
    #[arg(long, env = "CRIER_BOARD_UPDATE_INTERVAL", value_parser = humantime::parse_duration)]
    pub board_update_interval: Option<Duration>,
    /// Most open TCP connections (WebSocket, SSE and plain HTTP together) from one client
    /// address; IPv6 addresses count per /64. High because thousands of users can share
    /// one NAT address [default: 4096].
    #[arg(long, env = "CRIER_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// New connections per second one client address may open, after its burst is spent;
    /// high enough that a NAT's (or a benchmark's) reconnect storm refills within seconds
    /// [default: 1024].
    #[arg(long, env = "CRIER_CONNECT_RATE_PER_IP")]
    pub connect_rate_per_ip: Option<u32>,
    /// New connections one client address may open at once before connect_rate_per_ip
    /// applies [default: 4096].
    #[arg(long, env = "CRIER_CONNECT_BURST_PER_IP")]
    pub connect_burst_per_ip: Option<u32>,
    /// Most open TCP connections of any kind (subscribers and plain HTTP); past it new
    /// connections are refused. Keep it below the open-file limit [default: 18432].
    #[arg(long, env = "CRIER_MAX_SOCKETS")]
    pub max_sockets: Option<usize>,
    /// How long a client may take to send a request's headers, and how long an idle
    /// keep-alive connection is kept [default: 10s].
    #[arg(long, env = "CRIER_HEADER_READ_TIMEOUT", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Option<Duration>,
    /// How long a client may take to send a whole request body (answered 408 past it)
    /// [default: 10s].
    #[arg(long, env = "CRIER_BODY_READ_TIMEOUT", value_parser = humantime::parse_duration)]
    pub body_read_timeout: Option<Duration>,
    /// Publications kept per topic for resume and history reads, in topics no
    /// `[[namespace]]` of the settings file matches; 0 keeps none [default: 100].
    #[arg(long, env = "CRIER_HISTORY_SIZE")]
    pub history_size: Option<usize>,
    /// How long a publication stays in history, in topics no `[[namespace]]` matches
    /// [default: 5m].
    #[arg(long, env = "CRIER_HISTORY_TTL", value_parser = humantime::parse_duration)]
    pub history_ttl: Option<Duration>,
    /// Bytes of history the whole node keeps; past it the oldest publications of any topic
    /// leave first [default: 67108864].
    #[arg(long, env = "CRIER_HISTORY_MAX_BYTES")]
    pub history_max_bytes: Option<usize>,
    /// How long a publish `Idempotency-Key` is remembered: a retry within it gets the first
    /// receipt and publishes nothing [default: 5m].
    #[arg(long, env = "CRIER_IDEMPOTENCY_WINDOW", value_parser = humantime::parse_duration)]
    pub idempotency_window: Option<Duration>,
}

/// History settings for the topics whose names match `pattern` (TOML `[[namespace]]`,
/// first match wins): an exact name, or a prefix ending in `*` (`chat:*`).
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    pub pattern: String,
    /// Publications kept per topic [default: history_size].
    pub history_size: Option<usize>,
    /// How long each is kept, e.g. "10m" [default: history_ttl].
    pub history_ttl: Option<String>,
    /// Store publications in the data directory (group commit) and acknowledge them only
    /// once on disk; offsets and epoch survive a restart [default: false].
    #[serde(default)]
    pub durable: bool,
}

/// A namespace with its defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub pattern: String,
    pub history_size: usize,
    pub history_ttl: Duration,
    pub durable: bool,
}

impl Namespace {
    pub fn matches(&self, topic: &str) -> bool {
        match self.pattern.strip_suffix('*') {
            Some(prefix) => topic.starts_with(prefix),
            None => topic == self.pattern,
        }
    }
}

/// The settings file: same keys as the flags, durations as strings ("25s", "500ms").
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    publisher_keys: Option<Vec<String>>,
    allowed_origins: Option<Vec<String>>,
    public_origins: Option<Vec<String>>,
    max_connections: Option<usize>,
    max_topics: Option<usize>,
    max_subscriber_topics: Option<usize>,
    max_topics_per_connection: Option<usize>,
    max_message_bytes: Option<usize>,
    queue_max_bytes: Option<usize>,
    ping_interval: Option<String>,
    pong_timeout: Option<String>,
    write_timeout: Option<String>,
    drain_timeout: Option<String>,
    max_commands_per_second: Option<u32>,
    echo_endpoint: Option<bool>,
    board_top: Option<usize>,
    board_update_interval: Option<String>,
    max_connections_per_ip: Option<usize>,
    connect_rate_per_ip: Option<u32>,
    connect_burst_per_ip: Option<u32>,
    max_sockets: Option<usize>,
    header_read_timeout: Option<String>,
    body_read_timeout: Option<String>,
    history_size: Option<usize>,
    history_ttl: Option<String>,
    history_max_bytes: Option<usize>,
    idempotency_window: Option<String>,
    #[serde(default)]
    namespace: Vec<NamespaceConfig>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub publisher_keys: Vec<String>,
    pub allowed_origins: Vec<String>,
    /// The service's own origins (see `origin`); with `allowed_origins`, the only pages
    /// trusted besides same-origin ones on an IP literal or localhost.
    pub public_origins: Vec<String>,
    pub max_connections: usize,
    pub max_topics: usize,
    pub max_subscriber_topics: usize,
    pub max_topics_per_connection: usize,
    pub max_message_bytes: usize,
    pub queue_max_bytes: usize,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub write_timeout: Duration,
    pub drain_timeout: Duration,
    pub max_commands_per_second: u32,
    pub echo_endpoint: bool,
    pub board_top: usize,
    pub board_update_interval: Duration,
    pub max_connections_per_ip: usize,
    pub connect_rate_per_ip: u32,
    pub connect_burst_per_ip: u32,
    pub max_sockets: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub history_size: usize,
    pub history_ttl: Duration,
    pub history_max_bytes: usize,
    pub idempotency_window: Duration,
    /// From the settings file, in file order; `namespace()` picks a topic's.
    pub namespaces: Vec<Namespace>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:7700".parse().expect("valid default address"),
            data_dir: PathBuf::from("crier-data"),
            publisher_keys: Vec::new(),
            allowed_origins: Vec::new(),
            public_origins: Vec::new(),
            max_connections: 16_384,
            max_topics: 100_000,
            max_subscriber_topics: 50_000,
            max_topics_per_connection: 64,
            max_message_bytes: 64 * 1024,
            queue_max_bytes: 1024 * 1024,
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
            // A page subscribing its 64 topics at once plus an app-level ping a second stays
            // far below; a flood from one socket is cut off within a fraction of a second.
            max_commands_per_second: 100,
            echo_endpoint: false,
            board_top: 10,
            board_update_interval: Duration::from_millis(50),
            // 2,500 benchmark clients per loopback address, or a few thousand users behind
            // one NAT, fit under both per-IP limits; one address still cannot take every
            // socket.
            max_connections_per_ip: 4096,
            connect_rate_per_ip: 1024,
            connect_burst_per_ip: 4096,
            // max_connections subscribers plus 2,048 plain HTTP connections.
            max_sockets: 16_384 + 2048,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            history_max_bytes: 64 * 1024 * 1024,
            idempotency_window: Duration::from_secs(300),
            namespaces: Vec::new(),
        }
    }
}

/// The most top entries a board may show watchers: a snapshot is re-sent whole on every
/// change, so this bounds the size of each update.
pub const MAX_BOARD_TOP: usize = 100;

impl Config {
    /// Merges flags/variables over the file over the defaults, then checks the result.
    pub fn resolve(args: &ServeArgs) -> anyhow::Result<Config> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let d = Config::default();
        let dur = |flag: Option<Duration>, file: &Option<String>, name: &str, def: Duration| {
            if let Some(v) = flag {
                return Ok(v);
            }
            match file {
                Some(s) => humantime::parse_duration(s)
                    .with_context(|| format!("config key {name}: bad duration {s:?}")),
                None => Ok(def),
            }
        };
        let max_topics = args.max_topics.or(file.max_topics).unwrap_or(d.max_topics);
        let cfg = Config {
            listen: args.listen.or(file.listen).unwrap_or(d.listen),
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or(d.data_dir),
            publisher_keys: args
                .publisher_keys
                .clone()
                .or(file.publisher_keys)
                .unwrap_or_default()
                .into_iter()
                .map(|k| k.trim().to_string())
                .filter(|k| !k.is_empty())
                .collect(),
            allowed_origins: args
                .allowed_origins
                .clone()
                .or(file.allowed_origins)
                .unwrap_or_default()
                .into_iter()
                .map(|o| o.trim().trim_end_matches('/').to_string())
                .filter(|o| !o.is_empty())
                .collect(),
            public_origins: args
                .public_origins
                .clone()
                .or(file.public_origins)
                .unwrap_or_default()
                .into_iter()
                .map(|o| o.trim().trim_end_matches('/').to_string())
                .filter(|o| !o.is_empty())
                .collect(),
            max_connections: args
                .max_connections
                .or(file.max_connections)
                .unwrap_or(d.max_connections),
            max_topics,
            // Follows max_topics unless set, so raising one keeps the split.
            max_subscriber_topics: args
                .max_subscriber_topics
                .or(file.max_subscriber_topics)
                .unwrap_or(max_topics / 2),
            max_topics_per_connection: args
                .max_topics_per_connection
                .or(file.max_topics_per_connection)
                .unwrap_or(d.max_topics_per_connection),
            max_message_bytes: args
                .max_message_bytes
                .or(file.max_message_bytes)
                .unwrap_or(d.max_message_bytes),
            queue_max_bytes: args
                .queue_max_bytes
                .or(file.queue_max_bytes)
                .unwrap_or(d.queue_max_bytes),
            ping_interval: dur(
                args.ping_interval,
                &file.ping_interval,
                "ping_interval",
                d.ping_interval,
            )?,
            pong_timeout: dur(
                args.pong_timeout,
                &file.pong_timeout,
                "pong_timeout",
                d.pong_timeout,
            )?,
            write_timeout: dur(
                args.write_timeout,
                &file.write_timeout,
                "write_timeout",
                d.write_timeout,
            )?,
            drain_timeout: dur(
                args.drain_timeout,
                &file.drain_timeout,
                "drain_timeout",
                d.drain_timeout,
            )?,
            max_commands_per_second: args
                .max_commands_per_second
                .or(file.max_commands_per_second)
                .unwrap_or(d.max_commands_per_second),
            echo_endpoint: args
                .echo_endpoint
                .or(file.echo_endpoint)
                .unwrap_or(d.echo_endpoint),
            board_top: args.board_top.or(file.board_top).unwrap_or(d.board_top),
            board_update_interval: dur(
                args.board_update_interval,
                &file.board_update_interval,
                "board_update_interval",
                d.board_update_interval,
            )?,
            max_connections_per_ip: args
                .max_connections_per_ip
                .or(file.max_connections_per_ip)
                .unwrap_or(d.max_connections_per_ip),
            connect_rate_per_ip: args
                .connect_rate_per_ip
                .or(file.connect_rate_per_ip)
                .unwrap_or(d.connect_rate_per_ip),
            connect_burst_per_ip: args
                .connect_burst_per_ip
                .or(file.connect_burst_per_ip)
                .unwrap_or(d.connect_burst_per_ip),
            max_sockets: args
                .max_sockets
                .or(file.max_sockets)
                .unwrap_or(d.max_sockets),
            header_read_timeout: dur(
                args.header_read_timeout,
                &file.header_read_timeout,
                "header_read_timeout",
                d.header_read_timeout,
            )?,
            body_read_timeout: dur(
                args.body_read_timeout,
                &file.body_read_timeout,
                "body_read_timeout",
                d.body_read_timeout,
            )?,
            ..Config::default()
        };
        let mut cfg = cfg;
        cfg.history_size = args
            .history_size
            .or(file.history_size)
            .unwrap_or(d.history_size);
        cfg.history_ttl = dur(
            args.history_ttl,
            &file.history_ttl,
            "history_ttl",
            d.history_ttl,
        )?;
        cfg.history_max_bytes = args
            .history_max_bytes
            .or(file.history_max_bytes)
            .unwrap_or(d.history_max_bytes);
        cfg.idempotency_window = dur(
            args.idempotency_window,
            &file.idempotency_window,
            "idempotency_window",
            d.idempotency_window,
        )?;
        for ns in &file.namespace {
            let ttl = match &ns.history_ttl {
                Some(s) => humantime::parse_duration(s).with_context(|| {
                    format!("namespace {:?}: bad history_ttl {s:?}", ns.pattern)
                })?,
                None => cfg.history_ttl,
            };
            cfg.namespaces.push(Namespace {
                pattern: ns.pattern.clone(),
                history_size: ns.history_size.unwrap_or(cfg.history_size),
                history_ttl: ttl,
                durable: ns.durable,
            });
        }
        cfg.check()?;
        Ok(cfg)
    }

    /// The history settings of `topic`: the first `[[namespace]]` that matches, else the
    /// node defaults (memory only).
    pub fn namespace(&self, topic: &str) -> Namespace {
        self.namespaces
            .iter()
            .find(|n| n.matches(topic))
            .cloned()
            .unwrap_or_else(|| Namespace {
                pattern: "*".into(),
                history_size: self.history_size,
                history_ttl: self.history_ttl,
                durable: false,
            })
    }

    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.max_connections >= 1,
            "max_connections must be at least 1"
        );
        anyhow::ensure!(self.max_topics >= 1, "max_topics must be at least 1");
        anyhow::ensure!(
            self.max_subscriber_topics <= self.max_topics,
            "max_subscriber_topics must not exceed max_topics"
        );
        anyhow::ensure!(
            self.max_topics_per_connection >= 1,
            "max_topics_per_connection must be at least 1"
        );
        anyhow::ensure!(
            (16..=16 * 1024 * 1024).contains(&self.max_message_bytes),
            "max_message_bytes must be between 16 and 16777216"
        );
        anyhow::ensure!(
            self.queue_max_bytes >= self.max_message_bytes + 64,
            "queue_max_bytes must exceed max_message_bytes, or one message could never be queued"
        );
        anyhow::ensure!(
            self.max_commands_per_second >= 1,
            "max_commands_per_second must be at least 1"
        );
        for (name, d) in [
            ("ping_interval", self.ping_interval),
            ("pong_timeout", self.pong_timeout),
            ("write_timeout", self.write_timeout),
            ("header_read_timeout", self.header_read_timeout),
            ("body_read_timeout", self.body_read_timeout),
        ] {
            anyhow::ensure!(
                d >= Duration::from_millis(10),
                "{name} must be at least 10ms"
            );
        }
        anyhow::ensure!(
            (1..=MAX_BOARD_TOP).contains(&self.board_top),
            "board_top must be between 1 and {MAX_BOARD_TOP}"
        );
        for (name, v) in [
            ("max_connections_per_ip", self.max_connections_per_ip),
            ("connect_rate_per_ip", self.connect_rate_per_ip as usize),
            ("connect_burst_per_ip", self.connect_burst_per_ip as usize),
            ("max_sockets", self.max_sockets),
        ] {
            anyhow::ensure!(v >= 1, "{name} must be at least 1");
        }
        for ns in &self.namespaces {
            let body = ns.pattern.strip_suffix('*').unwrap_or(&ns.pattern);
            anyhow::ensure!(
                (body.is_empty() && ns.pattern == "*") || crate::topic::is_valid(body),
                "namespace pattern {:?} must be a topic name, optionally ending in *",
                ns.pattern
            );
            anyhow::ensure!(
                ns.history_size <= 1_000_000,
                "namespace {:?}: history_size must be at most 1000000",
                ns.pattern
            );
        }
        anyhow::ensure!(
            self.history_size <= 1_000_000,
            "history_size must be at most 1000000"
        );
        for (name, list) in [
            ("allowed origin", &self.allowed_origins),
            ("public origin", &self.public_origins),
        ] {
            for o in list {
                anyhow::ensure!(
                    crate::origin::Origin::parse(o).is_some(),
                    "{name} {o:?} must be scheme://host[:port] with scheme http or https \
                     and no path"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_beats_file_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crier.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\nping_interval = \"3s\"\nmax_topics_per_connection = 5\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            max_topics_per_connection: Some(7),
            ..Default::default()
        };
        let cfg = Config::resolve(&args).unwrap();
        assert_eq!(cfg.listen.port(), 9000);
        assert_eq!(cfg.ping_interval, Duration::from_secs(3));
        assert_eq!(cfg.max_topics_per_connection, 7);
        assert_eq!(cfg.pong_timeout, Duration::from_secs(10));
    }

    #[test]
    fn subscriber_topics_default_to_half_of_max_topics() {
        assert_eq!(Config::default().max_subscriber_topics, 50_000);
        let cfg = Config::resolve(&ServeArgs {
            max_topics: Some(1000),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.max_subscriber_topics, 500);
        let over = ServeArgs {
            max_topics: Some(1000),
            max_subscriber_topics: Some(1001),
            ..Default::default()
        };
        assert!(Config::resolve(&over).is_err());
    }

    #[test]
    fn connection_limits_come_from_flags_variables_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crier.toml");
        std::fs::write(
            &path,
            "max_sockets = 300\nmax_connections_per_ip = 20\nconnect_rate_per_ip = 5\n\
             connect_burst_per_ip = 7\nheader_read_timeout = \"3s\"\n\
             body_read_timeout = \"4s\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            max_sockets: Some(400),
            ..Default::default()
        };
        let cfg = Config::resolve(&args).unwrap();
        assert_eq!(cfg.max_sockets, 400);
        assert_eq!(cfg.max_connections_per_ip, 20);
        assert_eq!(cfg.connect_rate_per_ip, 5);
        assert_eq!(cfg.connect_burst_per_ip, 7);
        assert_eq!(cfg.header_read_timeout, Duration::from_secs(3));
        assert_eq!(cfg.body_read_timeout, Duration::from_secs(4));
        for bad in [
            ServeArgs {
                max_connections_per_ip: Some(0),
                ..Default::default()
            },
            ServeArgs {
                connect_burst_per_ip: Some(0),
                ..Default::default()
            },
            ServeArgs {
                body_read_timeout: Some(Duration::ZERO),
                ..Default::default()
            },
        ] {
            assert!(Config::resolve(&bad).is_err());
        }
    }

    #[test]
    fn command_rate_and_echo_endpoint() {
        let d = Config::resolve(&ServeArgs::default()).unwrap();
        assert_eq!((d.max_commands_per_second, d.echo_endpoint), (100, false));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crier.toml");
        std::fs::write(&path, "max_commands_per_second = 7\necho_endpoint = true\n").unwrap();
        let cfg = Config::resolve(&ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((cfg.max_commands_per_second, cfg.echo_endpoint), (7, true));
        let cfg = Config::resolve(&ServeArgs {
            config: Some(path),
            max_commands_per_second: Some(9),
            echo_endpoint: Some(false),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((cfg.max_commands_per_second, cfg.echo_endpoint), (9, false));
        assert!(Config::resolve(&ServeArgs {
            max_commands_per_second: Some(0),
            ..Default::default()
        })
        .is_err());
    }

    #[test]
    fn unknown_file_key_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crier.toml");
        std::fs::write(&path, "lisen = \"127.0.0.1:9000\"\n").unwrap();
        let err = Config::resolve(&ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        });
        assert!(format!("{:#}", err.unwrap_err()).contains("lisen"));
        std::fs::write(&path, "ping_interval = \"soon\"\n").unwrap();
        assert!(Config::resolve(&ServeArgs {
            config: Some(path),
            ..Default::default()
        })
        .is_err());
        let bad = ServeArgs {
            max_message_bytes: Some(1),
            ..Default::default()
        };
        assert!(Config::resolve(&bad).is_err());
    }

    #[test]
    fn origins_come_from_file_and_must_be_origins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crier.toml");
        std::fs::write(
            &path,
            "public_origins = [\"https://crier.example/\"]\nallowed_origins = [\"https://game.example\"]\n",
        )
        .unwrap();
        let cfg = Config::resolve(&ServeArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.public_origins, ["https://crier.example"]);
        assert_eq!(cfg.allowed_origins, ["https://game.example"]);
        for bad in ["crier.example", "https://crier.example/app", "null"] {
            let args = ServeArgs {
                public_origins: Some(vec![bad.into()]),
                ..Default::default()
            };
            assert!(Config::resolve(&args).is_err(), "{bad}");
        }
    }
}
