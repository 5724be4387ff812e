//! Server settings. Each is declared once, in the `settings!` list below: name, type,
//! default, an example and its help. From the name come the flag (`--max-topics`), the
//! variable (`CRIER_MAX_TOPICS`) and the key in the optional TOML file (`max_topics`);
//! precedence is flag > variable > file > built-in default. clap reads flags and variables
//! (so `--help` lists both), the file is read key by key, and `Config::resolve` merges.
//! What does not fit one line of the list stays explicit in `resolve`: lists are trimmed,
//! `max_subscriber_topics` follows `max_topics`, `[[namespace]]`, `[[key]]` and `[[board]]`
//! tables are TOML-only.
//!
//! Only plain data lives here, checked for what a value alone can say (ranges, durations,
//! namespace patterns). What a setting means to the modules that use it (publisher keys,
//! token settings, origins, board policies) those modules check: `server::check_config`
//! runs them all before a server starts.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Arg, ArgAction, ArgMatches};
use serde::Deserialize;

/// How one setting's type is read from a flag or variable and from the TOML file, and how
/// it is written back (help, docs, tests).
pub trait SettingValue: Clone + fmt::Debug + Send + Sync + 'static {
    /// A value every flag of this type refuses, for the `--help` test; `None` when any
    /// text is a valid value (paths, keys).
    const INVALID: Option<&'static str>;
    /// Parses a flag or `CRIER_*` value.
    fn parse(s: &str) -> Result<Self, String>;
    /// Reads the value of the setting's key in the TOML file.
    fn from_toml(v: toml::Value) -> Result<Self, String>;
    /// The value as a flag would take it.
    fn show(&self) -> String;
    /// The value as the TOML file would hold it.
    fn to_toml(&self) -> toml::Value;
    /// Lists repeat and switches may stand alone; everything else takes one value.
    fn adjust(arg: Arg) -> Arg {
        arg.value_parser(Self::parse)
    }
    fn from_matches(m: &ArgMatches, id: &str) -> Option<Self> {
        m.get_one::<Self>(id).cloned()
    }
}

macro_rules! plain_setting_value {
    ($($ty:ty => $invalid:expr),* $(,)?) => {$(
        impl SettingValue for $ty {
            const INVALID: Option<&'static str> = $invalid;
            fn parse(s: &str) -> Result<Self, String> {
                s.parse().map_err(|e| format!("{e}"))
            }
            fn from_toml(v: toml::Value) -> Result<Self, String> {
                Self::deserialize(v).map_err(|e| e.to_string())
            }
            fn show(&self) -> String {
                self.to_string()
            }
            fn to_toml(&self) -> toml::Value {
                toml::Value::try_from(self).expect("a plain value")
            }
        }
    )*};
}

plain_setting_value!(usize => Some("many"), u32 => Some("-1"), SocketAddr => Some("nowhere"));

impl SettingValue for bool {
    const INVALID: Option<&'static str> = Some("maybe");
    fn parse(s: &str) -> Result<Self, String> {
        s.parse().map_err(|_| format!("{s:?} is not true or false"))
    }
    fn from_toml(v: toml::Value) -> Result<Self, String> {
        Self::deserialize(v).map_err(|e| e.to_string())
    }
    fn show(&self) -> String {
        self.to_string()
    }
    fn to_toml(&self) -> toml::Value {
        toml::Value::Boolean(*self)
    }
    /// `--echo-endpoint` alone means true.
    fn adjust(arg: Arg) -> Arg {
        arg.value_parser(Self::parse)
            .num_args(0..=1)
            .default_missing_value("true")
    }
}

impl SettingValue for PathBuf {
    const INVALID: Option<&'static str> = None;
    fn parse(s: &str) -> Result<Self, String> {
        Ok(PathBuf::from(s))
    }
    fn from_toml(v: toml::Value) -> Result<Self, String> {
        Self::deserialize(v).map_err(|e| e.to_string())
    }
    fn show(&self) -> String {
        self.display().to_string()
    }
    fn to_toml(&self) -> toml::Value {
        toml::Value::String(self.show())
    }
}

/// Durations are written as humantime text everywhere ("25s", "500ms", "5m").
impl SettingValue for Duration {
    const INVALID: Option<&'static str> = Some("soon");
    fn parse(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s).map_err(|e| format!("bad duration {s:?}: {e}"))
    }
    fn from_toml(v: toml::Value) -> Result<Self, String> {
        match v {
            toml::Value::String(s) => Self::parse(&s),
            other => Err(format!(
                "a duration is a string such as \"25s\", not {}",
                other.type_str()
            )),
        }
    }
    fn show(&self) -> String {
        humantime::format_duration(*self).to_string()
    }
    fn to_toml(&self) -> toml::Value {
        toml::Value::String(self.show())
    }
}

/// Free text (a URL); empty means "not set".
impl SettingValue for String {
    const INVALID: Option<&'static str> = None;
    fn parse(s: &str) -> Result<Self, String> {
        Ok(s.to_string())
    }
    fn from_toml(v: toml::Value) -> Result<Self, String> {
        Self::deserialize(v).map_err(|e| e.to_string())
    }
    fn show(&self) -> String {
        self.clone()
    }
    fn to_toml(&self) -> toml::Value {
        toml::Value::String(self.clone())
    }
}

/// A list: the flag repeats or takes commas, the variable takes commas, the file an array.
impl SettingValue for Vec<String> {
    const INVALID: Option<&'static str> = None;
    fn parse(s: &str) -> Result<Self, String> {
        Ok(s.split(',').map(str::to_string).collect())
    }
    fn from_toml(v: toml::Value) -> Result<Self, String> {
        Self::deserialize(v).map_err(|e| e.to_string())
    }
    fn show(&self) -> String {
        self.join(",")
    }
    fn to_toml(&self) -> toml::Value {
        toml::Value::Array(self.iter().cloned().map(toml::Value::String).collect())
    }
    fn adjust(arg: Arg) -> Arg {
        arg.action(ArgAction::Append).value_delimiter(',')
    }
    fn from_matches(m: &ArgMatches, id: &str) -> Option<Self> {
        m.get_many::<String>(id).map(|v| v.cloned().collect())
    }
}

/// One declared setting, as `--help`, docs/configuration.md and the tests see it.
#[derive(Debug, Clone)]
pub struct Setting {
    /// The `Config` field and the TOML key.
    pub name: &'static str,
    /// The long flag, without `--`.
    pub flag: String,
    pub env: String,
    pub help: String,
    /// The default as documented (may be prose, e.g. "half of max_topics").
    pub default: String,
    /// A valid value other than the default, as a flag takes it.
    pub example: &'static str,
    /// A value the flag refuses, if the type has one.
    pub invalid: Option<&'static str>,
    /// `example` as a TOML value.
    pub toml_example: toml::Value,
    /// `invalid` as a TOML value: the same value when the flag parser takes it and only
    /// `Config::resolve` refuses it, else the text as a TOML string (of the wrong type).
    pub toml_invalid: Option<toml::Value>,
}

macro_rules! pick {
    ($given:literal, $fallback:expr) => {
        $given.to_string()
    };
    (, $fallback:expr) => {
        $fallback
    };
}

macro_rules! pick_invalid {
    ($given:literal, $fallback:expr) => {
        Some($given)
    };
    (, $fallback:expr) => {
        $fallback
    };
}

/// Declares every setting once. Each entry: doc lines (the help), `name: Type = default`,
/// `example "..."` (a valid non-default value, for the tests), then optionally `flag "..."`
/// (when the flag is not the name with `-`), `shown "..."` (a default in words) and
/// `invalid "..."` (a refused value the type alone does not give).
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])*
        $name:ident : $ty:ty = $default:expr, example $example:literal
            $(, flag $flag:literal)? $(, shown $shown:literal)? $(, invalid $invalid:literal)? ;
    )*) => {
        /// The resolved settings the server runs with.
        #[derive(Debug, Clone)]
        pub struct Config {
            $( $(#[doc = $doc])* pub $name: $ty, )*
            /// From the settings file, in file order; `namespace()` picks a topic's.
            pub namespaces: Vec<Namespace>,
            /// `[[key]]` tables as written: publisher keys limited to a scope (checked and
            /// parsed by auth::keys).
            pub keys: Vec<KeyConfig>,
            /// `[[board]]` tables as written, in file order: the first whose pattern matches
            /// a board applies (checked and parsed by leaderboard::policy).
            pub board_policies: Vec<BoardPolicyConfig>,
            /// `[[app]]` tables as written: Pusher Channels apps (checked by pusher::apps).
            pub apps: Vec<AppConfig>,
        }

        impl Default for Config {
            fn default() -> Self {
                Config {
                    $( $name: $default, )*
                    namespaces: Vec::new(),
                    keys: Vec::new(),
                    board_policies: Vec::new(),
                    apps: Vec::new(),
                }
            }
        }

        /// Options of `crier serve` (and `demo`), and equally one layer of settings (the
        /// file's). Every field is optional so the merge can tell "not given" from "given as
        /// the default".
        #[derive(Debug, Clone, Default)]
        pub struct ServeArgs {
            pub config: Option<PathBuf>,
            $( pub $name: Option<$ty>, )*
        }

        /// Every declared setting, in declaration order.
        pub fn settings() -> Vec<Setting> {
            let d = Config::default();
            vec![$(
                Setting {
                    name: stringify!($name),
                    flag: pick!($($flag)?, stringify!($name).replace('_', "-")),
                    env: format!("CRIER_{}", stringify!($name).to_uppercase()),
                    help: [$($doc),*].iter().map(|l| l.trim()).collect::<Vec<_>>().join(" "),
                    default: pick!($($shown)?, SettingValue::show(&d.$name)),
                    example: $example,
                    invalid: pick_invalid!($($invalid)?, <$ty as SettingValue>::INVALID),
                    toml_example: <$ty as SettingValue>::parse($example)
                        .expect("the example parses")
                        .to_toml(),
                    toml_invalid: pick_invalid!($($invalid)?, <$ty as SettingValue>::INVALID)
                        .map(|bad: &str| match <$ty as SettingValue>::parse(bad) {
                            Ok(v) => v.to_toml(),
                            Err(_) => toml::Value::String(bad.to_string()),
                        }),
                },
            )*]
        }

        impl ServeArgs {
            fn add_settings(mut cmd: clap::Command) -> clap::Command {
                let all = settings();
                let mut all = all.iter();
                $(
                    let s = all.next().expect("one descriptor per setting");
                    cmd = cmd.arg(<$ty as SettingValue>::adjust(
                        Arg::new(stringify!($name))
                            .long(s.flag.clone())
                            .value_name(s.name.to_uppercase())
                            .env(s.env.clone())
                            // `--help` would print a secret taken from the environment.
                            .hide_env_values(SECRET_SETTINGS.contains(&s.name))
                            .help(format!("{} [default: {}]", s.help, s.default)),
                    ));
                )*
                cmd
            }

            fn from_matches(m: &ArgMatches) -> ServeArgs {
                ServeArgs {
                    config: m.get_one::<PathBuf>("config").cloned(),
                    $( $name: <$ty as SettingValue>::from_matches(m, stringify!($name)), )*
                }
            }

            /// The settings of a TOML file (and its namespaces, keys and board policies),
            /// refusing unknown keys.
            fn from_file(text: &str) -> anyhow::Result<(ServeArgs, Vec<NamespaceConfig>, FileTables)> {
                let table: toml::Table = toml::from_str(text)?;
                let mut layer = ServeArgs::default();
                let mut namespaces = Vec::new();
                let mut tables = FileTables::default();
                for (key, value) in table {
                    match key.as_str() {
                        $( stringify!($name) => {
                            let v = <$ty as SettingValue>::from_toml(value)
                                .map_err(|e| anyhow::anyhow!("config key {key}: {e}"))?;
                            layer.$name = Some(v);
                        } )*
                        "namespace" => {
                            namespaces = Vec::<NamespaceConfig>::deserialize(value)
                                .context("config key namespace")?;
                        }
                        "key" => {
                            tables.keys = Vec::<KeyConfig>::deserialize(value)
                                .context("[[key]] tables")?;
                        }
                        "board" => {
                            tables.boards = Vec::<BoardPolicyConfig>::deserialize(value)
                                .context("[[board]] tables")?;
                        }
                        "app" => {
                            tables.apps = Vec::<AppConfig>::deserialize(value)
                                .context("[[app]] tables")?;
                        }
                        other => anyhow::bail!(
                            "unknown config key {other:?} (keys are the setting names, \
                             e.g. max_topics; see docs/configuration.md)"
                        ),
                    }
                }
                Ok((layer, namespaces, tables))
            }

            /// This layer over `under`, field by field.
            fn over(&self, under: ServeArgs) -> ServeArgs {
                ServeArgs {
                    config: self.config.clone().or(under.config),
                    $( $name: self.$name.clone().or(under.$name), )*
                }
            }

            /// The given values over the defaults.
            fn apply(self, cfg: &mut Config) {
                $( if let Some(v) = self.$name { cfg.$name = v; } )*
            }
        }

        impl Config {
            /// A setting's value as a flag would take it, by name.
            pub fn shown(&self, name: &str) -> Option<String> {
                match name {
                    $( stringify!($name) => Some(SettingValue::show(&self.$name)), )*
                    _ => None,
                }
            }
        }
    };
}

settings! {
    /// Address to listen on.
    listen: SocketAddr = "127.0.0.1:7700".parse().expect("valid default address"),
        example "127.0.0.1:7701";
    /// Folder for durable data (leaderboards, durable history).
    data_dir: PathBuf = PathBuf::from("crier-data"), example "/var/lib/crier";
    /// Publisher key; repeat or comma-separate for several. When any is set, publishing and
    /// score posting need `Authorization: Bearer <key>`.
    publisher_keys: Vec<String> = Vec::new(), example "k1,k2", flag "publisher-key",
        shown "none, publishing is open";
    /// Topics that need a subscriber token allowing them: a name, or a prefix ending in `*`
    /// (`private:*`); repeatable. Other topics stay public.
    private_topics: Vec<String> = Vec::new(), example "private:*,user:*", flag "private-topic",
        shown "none, every topic is public", invalid "a b";
    /// HS256 secret (at least 32 bytes) that subscriber tokens are signed with.
    jwt_secret: String = String::new(), example "a-secret-of-at-least-thirty-two-bytes",
        shown "none", invalid "short";
    /// PEM public key (RSA for RS256, EC P-256 for ES256) that subscriber tokens are signed
    /// with; repeatable, e.g. during a key rotation.
    jwt_public_key: Vec<String> = Vec::new(), example "/etc/crier/jwt.pem", shown "none";
    /// JWKS file (JSON) of RS256/ES256 keys, chosen by each token's `kid`.
    jwt_jwks: String = String::new(), example "/etc/crier/jwks.json", shown "none";
    /// Another site whose pages may open WebSockets and SSE streams and write here (e.g.
    /// https://game.example); repeatable.
    allowed_origins: Vec<String> = Vec::new(), example "https://game.example",
        flag "allowed-origin", shown "none", invalid "game.example/path";
    /// Origin browsers use to reach this service (e.g. https://crier.example); repeatable.
    /// Needed behind a domain name: unlisted, only pages served from an IP address or
    /// localhost count as same-origin, which is what stops DNS rebinding.
    public_origins: Vec<String> = Vec::new(), example "https://crier.example",
        flag "public-origin", shown "none", invalid "crier.example";
    /// Most subscriber connections (WebSocket + SSE) held at once.
    max_connections: usize = 16_384, example "1000";
    /// Most topics tracked by the node; idle topics are evicted past it.
    max_topics: usize = 100_000, example "1000";
    /// Most topics that exist only because clients subscribed to them (never published to);
    /// the rest of max_topics stays free for topics that are published to.
    max_subscriber_topics: usize = 50_000, example "1000",
        shown "half of max_topics, 50000";
    /// Most topics one connection may subscribe to.
    max_topics_per_connection: usize = 64, example "8";
    /// Largest published body or client message, in bytes.
    max_message_bytes: usize = 64 * 1024, example "32768";
    /// Bytes a client may have queued and unsent before it is disconnected as a slow
    /// consumer (close 4001).
    queue_max_bytes: usize = 1024 * 1024, example "2097152";
    /// How often to ping WebSocket clients and send SSE heartbeats.
    ping_interval: Duration = Duration::from_secs(25), example "30s";
    /// How long a pinged client may stay silent before it is closed (4002).
    pong_timeout: Duration = Duration::from_secs(10), example "20s";
    /// How long a socket write may make no progress before the client is closed (4003).
    write_timeout: Duration = Duration::from_secs(10), example "20s";
    /// On shutdown, how long to let clients drain their queues.
    drain_timeout: Duration = Duration::from_secs(5), example "1s";
    /// Frames one WebSocket connection may send per second (each command, ping, pong and
    /// fragment of a message counts), with bursts of twice as many; past it the client gets
    /// an error frame and close 4500.
    // A page subscribing its 64 topics at once plus an app-level ping a second stays far
    // below; a flood from one socket is cut off within a fraction of a second. Every frame
    // counts because each costs a decode, whatever it carries: empty continuations too.
    max_commands_per_second: u32 = 100, example "7";
    /// Most frames one WebSocket message may arrive in (its first frame and every
    /// continuation); past it the client is closed with 4502.
    // Follows max_message_bytes unless set (one fragment per 64 bytes, at least 64), so an
    // Autobahn run with 16 MiB messages (4 MiB in 64-byte fragments: 65,536) passes on it.
    max_fragments_per_message: usize = 1024, example "16",
        shown "one per 64 bytes of max_message_bytes (at least 64), 1024";
    /// Serve `/echo`, a WebSocket that echoes every message: for conformance testing
    /// (Autobahn) only, never in production.
    echo_endpoint: bool = false, example "true";
    /// Leaderboard watchers see at most this many top entries unless a board sets fewer.
    board_top: usize = 10, example "20", invalid "101";
    /// Shortest gap between two live updates of one board; bursts within it coalesce.
    board_update_interval: Duration = Duration::from_millis(50), example "100ms";
    /// Most leaderboards the node holds (under --redis: all nodes together); past it a new
    /// board is refused (503 too_many_boards). Boards already stored are kept and stay
    /// writable when a restart lowers it.
    max_boards: usize = 10_000, example "100", invalid "0";
    /// Most players one board holds, unless its [[board]] table sets its own; a score batch
    /// that would add players past it is refused whole (409 too_many_players). Players
    /// already on a board keep posting, also when a restart lowers it.
    max_players_per_board: usize = 100_000, example "1000", invalid "0";
    /// Most open TCP connections (WebSocket, SSE and plain HTTP together) from one client
    /// address; IPv6 addresses count per /64. High because thousands of users can share
    /// one NAT address.
    // 2,500 benchmark clients per loopback address, or a few thousand users behind one
    // NAT, fit under both per-IP limits; one address still cannot take every socket.
    max_connections_per_ip: usize = 4096, example "20";
    /// New connections per second one client address may open, after its burst is spent;
    /// high enough that a NAT's (or a benchmark's) reconnect storm refills within seconds.
    connect_rate_per_ip: u32 = 1024, example "5";
    /// New connections one client address may open at once before connect_rate_per_ip
    /// applies.
    connect_burst_per_ip: u32 = 4096, example "7";
    /// Most open TCP connections of any kind (subscribers and plain HTTP); past it new
    /// connections are refused. Keep it below the open-file limit.
    // max_connections subscribers plus 2,048 plain HTTP connections.
    max_sockets: usize = 16_384 + 2048, example "300";
    /// How long a client may take to send a request's headers, and how long an idle
    /// keep-alive connection is kept.
    header_read_timeout: Duration = Duration::from_secs(10), example "3s";
    /// How long a client may take to send a whole request body (answered 408 past it).
    body_read_timeout: Duration = Duration::from_secs(10), example "4s";
    /// Publications kept per topic for resume and history reads, in topics no
    /// `[[namespace]]` of the settings file matches; 0 keeps none.
    history_size: usize = 100, example "10", invalid "1000001";
    /// How long a publication stays in history, in topics no `[[namespace]]` matches.
    history_ttl: Duration = Duration::from_secs(300), example "1h";
    /// Bytes of history the whole node keeps; past it the oldest publications of any topic
    /// leave first.
    history_max_bytes: usize = 64 * 1024 * 1024, example "1048576";
    /// How long a publish `Idempotency-Key` is remembered: a retry within it gets the first
    /// receipt and publishes nothing.
    idempotency_window: Duration = Duration::from_secs(300), example "1m";
    /// Redis to share topics with other crier nodes: redis://host:port, rediss://host:port
    /// (TLS), or redis+unix:///path/to/redis.sock; unset, this node serves alone. See
    /// docs/scaling.md.
    redis: String = String::new(), example "redis://127.0.0.1:6379",
        shown "none, one node alone";
    /// How long a Redis command may take before the request that needed it fails with 503
    /// (store_unavailable): a stalled Redis makes publishes fail fast, never hang.
    redis_timeout: Duration = Duration::from_secs(2), example "500ms";
    /// How long Redis keeps a topic's offset and epoch after its last publish while no node
    /// holds a subscriber of it. Nodes refresh it for their subscribed topics, so live topics
    /// never expire; a dead one comes back under a new epoch (resumes then hear
    /// `recovered:false`). Bounds what subscribers to fresh names leave in Redis.
    redis_topic_ttl: Duration = Duration::from_secs(24 * 3600), example "1h";
    /// PEM file of the CA that signed the Redis server's certificate, for a `rediss://` Redis
    /// with a private CA (ignored for other URLs); unset, the public web roots are trusted.
    redis_ca: String = String::new(), example "/etc/crier/redis-ca.pem",
        shown "none, the public web roots";
    /// Shape of each log line on stdout: `text` for people, `json` for log pipelines (one
    /// object per line). Which lines is the CRIER_LOG variable (`info` unless set).
    log_format: LogFormat = LogFormat::Text, example "json";
    /// PEM certificate chain for TLS on the listener (HTTPS, wss://), leaf first; with
    /// tls_key. Reloaded on SIGHUP and when the file changes; an invalid or expired one
    /// stops the start.
    tls_cert: String = String::new(), example "/etc/crier/cert.pem", shown "none, plain HTTP";
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of tls_cert.
    tls_key: String = String::new(), example "/etc/crier/key.pem", shown "none";
    /// URL each webhook event is POSTed to (http:// only; put TLS in front of a receiver on
    /// another host); repeatable: every URL gets every event, from its own queue. See
    /// docs/webhooks.md.
    webhook_urls: Vec<String> = Vec::new(), example "http://127.0.0.1:9000/crier",
        flag "webhook-url", shown "none, no webhooks";
    /// Key of each delivery's `X-Crier-Signature` (HMAC-SHA256), at least 32 bytes; needed
    /// with webhook_url.
    webhook_secret: String = String::new(), example "0123456789abcdef0123456789abcdef",
        shown "none";
    /// Which events are sent: any of topic_occupied, topic_vacated, member_joined,
    /// member_left; repeatable or comma-separated.
    webhook_events: Vec<String> = Vec::new(), example "topic_occupied,topic_vacated",
        shown "all";
    /// How long a topic stays empty before topic_vacated is sent; a subscriber back within
    /// it cancels both (a page reload does not flap).
    webhook_vacate_grace: Duration = Duration::from_secs(5), example "2s";
    /// Most events in one POST.
    webhook_batch_max: usize = 100, example "500";
    /// How long the first event of a batch waits for more before the POST.
    webhook_linger: Duration = Duration::from_millis(50), example "10ms";
    /// Events each URL's queue holds while its receiver is slow or down; past it the oldest
    /// are dropped (counted in crier_webhook_events_total{outcome="dropped"}).
    webhook_queue_max: usize = 10_000, example "100000";
    /// How long one POST may take before it counts as failed and is retried.
    webhook_timeout: Duration = Duration::from_secs(5), example "2s";
    /// Id of one Pusher Channels app (the simple case; more apps: [[app]] tables). With
    /// pusher_key and pusher_secret, Pusher clients connect to /app/{key} and server SDKs
    /// call /apps/{id}/... See docs/pusher.md.
    pusher_app_id: String = String::new(), example "app1", shown "none";
    /// Key of the pusher_app_id app (what pusher-js is given).
    pusher_key: String = String::new(), example "app-key", shown "none";
    /// Secret of the pusher_app_id app: signs its HTTP API calls and channel authorizations.
    pusher_secret: String = String::new(), example "app-secret", shown "none";
}

/// The webhook events `webhook_events` may name (docs/webhooks.md).
pub const WEBHOOK_EVENTS: &[&str] = &[
    "topic_occupied",
    "topic_vacated",
    "member_joined",
    "member_left",
];

/// Settings whose values are credentials: never shown by `--help`.
const SECRET_SETTINGS: &[&str] = &[
    "jwt_secret",
    "publisher_keys",
    "webhook_secret",
    "pusher_secret",
];

/// The `--config` flag: the one argument that is not a setting.
fn config_arg() -> Arg {
    Arg::new("config")
        .long("config")
        .env("CRIER_CONFIG")
        .value_name("CONFIG")
        .value_parser(clap::value_parser!(PathBuf))
        .help(
            "TOML file with any of the settings below; each key is the setting's variable \
             name without CRIER_, in lower case (max_topics, publisher_keys), plus \
             [[namespace]], [[key]] and [[board]] tables (docs/configuration.md)",
        )
}

impl clap::Args for ServeArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        ServeArgs::add_settings(cmd.arg(config_arg()))
    }
    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for ServeArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(ServeArgs::from_matches(m))
    }
    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = ServeArgs::from_matches(m).over(std::mem::take(self));
        Ok(())
    }
}

/// The table docs/configuration.md holds between its markers; a test keeps the two equal.
pub fn markdown_table() -> String {
    let mut out =
        String::from("| TOML key | flag | variable | default | meaning |\n|---|---|---|---|---|\n");
    for s in settings() {
        out.push_str(&format!(
            "| `{}` | `--{}` | `{}` | {} | {} |\n",
            s.name, s.flag, s.env, s.default, s.help
        ));
    }
    out
}

/// The `[[key]]` and `[[board]]` tables of a settings file, as written.
#[derive(Default)]
pub struct FileTables {
    pub keys: Vec<KeyConfig>,
    pub boards: Vec<BoardPolicyConfig>,
    pub apps: Vec<AppConfig>,
}

/// One `[[app]]` table as written (docs/pusher.md): a Pusher Channels app;
/// `pusher::apps::App` is the checked form.
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    pub id: String,
    pub key: String,
    pub secret: String,
    /// `client-*` events on private and presence channels.
    #[serde(default)]
    pub enable_client_events: bool,
    /// Most connections of this app on this node (the node's max_connections otherwise).
    pub max_connections: Option<usize>,
    /// URLs that get this app's webhooks in Pusher's format (docs/pusher.md).
    #[serde(default)]
    pub webhooks: Vec<String>,
}

/// Without the secret: `Config` is printed in debug logs.
impl fmt::Debug for AppConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppConfig")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("secret", &"<hidden>")
            .field("enable_client_events", &self.enable_client_events)
            .field("max_connections", &self.max_connections)
            .field("webhooks", &self.webhooks)
            .finish()
    }
}

/// One `[[key]]` table as written in the settings file (docs/configuration.md);
/// `auth::keys::ScopedKey` is the checked form.
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    pub name: String,
    pub secret: String,
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub boards: Vec<String>,
    #[serde(default)]
    pub reset: Vec<String>,
    #[serde(default)]
    pub admin: bool,
}

/// Without the secret: `Config` is printed in debug logs.
impl fmt::Debug for KeyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyConfig")
            .field("name", &self.name)
            .field("secret", &"<hidden>")
            .field("publish", &self.publish)
            .field("boards", &self.boards)
            .field("reset", &self.reset)
            .field("admin", &self.admin)
            .finish()
    }
}

/// One `[[board]]` table as written (docs/configuration.md);
/// `leaderboard::policy::BoardPolicy` is the checked form.
#[derive(Deserialize, Default, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct BoardPolicyConfig {
    pub pattern: String,
    pub min_score: Option<f64>,
    pub max_score: Option<f64>,
    pub max_submissions_per_minute: Option<u32>,
    #[serde(default)]
    pub scoped_keys_only: bool,
    /// This board's own `max_players_per_board` (the node-wide setting otherwise).
    pub max_players_per_board: Option<usize>,
    /// Season schedule of matching boards (a cron expression), unless their options set one.
    pub reset: Option<String>,
    /// The IANA zone `reset` is read in (UTC otherwise).
    pub timezone: Option<String>,
    /// Closed seasons matching boards keep (10 otherwise).
    pub keep_seasons: Option<usize>,
    /// Subscore direction (`high` / `low`) of matching boards, unless their options set
    /// one: equal scores rank by subscore.
    pub tiebreak: Option<String>,
    /// A player may follow only their own entry: `board:{b}@{p}` needs a token whose
    /// `sub` is `p` (checked by `auth::Auth::check_read`).
    #[serde(default)]
    pub follow_own_only: bool,
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
    /// Keep the topic's members (who is subscribed), readable over WebSocket and HTTP
    /// [default: false].
    #[serde(default)]
    pub presence: bool,
    /// Also push each join and leave to the topic's subscribers; needs `presence`
    /// [default: false].
    #[serde(default)]
    pub join_leave: bool,
}

/// A namespace with its defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub pattern: String,
    pub history_size: usize,
    pub history_ttl: Duration,
    pub durable: bool,
    pub presence: bool,
    pub join_leave: bool,
}

/// A topic's presence settings (`Config::presence`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PresenceMode {
    /// Members are kept.
    pub members: bool,
    /// Joins and leaves are pushed to subscribers.
    pub join_leave: bool,
}

impl Namespace {
    /// The `topic::TopicPattern` rule (checked by `Config::check`), on the text as written:
    /// `namespace()` runs per publish and must not parse.
    pub fn matches(&self, topic: &str) -> bool {
        match self.pattern.strip_suffix('*') {
            Some(prefix) => topic.starts_with(prefix),
            None => topic == self.pattern,
        }
    }
}

/// `max_fragments_per_message` when not set: a message of the largest size may come in
/// fragments of 64 bytes (the smallest the Autobahn suite sends), and a small limit still
/// leaves room for a client that splits a short command.
pub fn default_max_fragments(max_message_bytes: usize) -> usize {
    (max_message_bytes / 64).max(64)
}

/// The most top entries a board may show watchers: a snapshot is re-sent whole on every
/// change, so this bounds the size of each update.
pub const MAX_BOARD_TOP: usize = 100;

impl Config {
    /// Merges flags/variables over the file over the defaults, then checks the plain values
    /// (`server::check_config` has the domain check the rest).
    pub fn resolve(args: &ServeArgs) -> anyhow::Result<Config> {
        let (file, namespaces, tables) = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                ServeArgs::from_file(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => (ServeArgs::default(), Vec::new(), FileTables::default()),
        };
        let given = args.over(file);
        let subscriber_topics_given = given.max_subscriber_topics.is_some();
        let fragments_given = given.max_fragments_per_message.is_some();
        let mut cfg = Config::default();
        given.apply(&mut cfg);
        // Follows max_topics unless set, so raising one keeps the split.
        if !subscriber_topics_given {
            cfg.max_subscriber_topics = cfg.max_topics / 2;
        }
        if !fragments_given {
            cfg.max_fragments_per_message = default_max_fragments(cfg.max_message_bytes);
        }
        let clean = |list: &mut Vec<String>, trailing: &str| {
            *list = list
                .iter()
                .map(|v| v.trim().trim_end_matches(trailing).to_string())
                .filter(|v| !v.is_empty())
                .collect();
        };
        clean(&mut cfg.publisher_keys, "");
        clean(&mut cfg.private_topics, "");
        clean(&mut cfg.jwt_public_key, "");
        clean(&mut cfg.allowed_origins, "/");
        clean(&mut cfg.public_origins, "/");
        clean(&mut cfg.webhook_urls, "");
        clean(&mut cfg.webhook_events, "");
        for ns in &namespaces {
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
                presence: ns.presence,
                join_leave: ns.join_leave,
            });
        }
        cfg.keys = tables.keys;
        cfg.board_policies = tables.boards;
        cfg.apps = tables.apps;
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
                presence: false,
                join_leave: false,
            })
    }

    /// The presence settings of `topic` (its first matching `[[namespace]]`), without
    /// cloning the namespace: asked on every subscribe and unsubscribe.
    /// Whether any topic can have presence: a `presence` namespace, or a Pusher app (its
    /// `presence-` channels need no namespace).
    pub fn presence_anywhere(&self) -> bool {
        self.namespaces.iter().any(|n| n.presence)
            || !self.apps.is_empty()
            || !self.pusher_app_id.is_empty()
    }

    pub fn presence(&self, topic: &str) -> PresenceMode {
        // A Pusher presence channel: members, and Pusher's member_added / member_removed.
        if crate::topic::pusher_channel(topic).is_some_and(|c| c.starts_with("presence-")) {
            return PresenceMode {
                members: true,
                join_leave: true,
            };
        }
        match self.namespaces.iter().find(|n| n.matches(topic)) {
            Some(n) => PresenceMode {
                members: n.presence,
                join_leave: n.join_leave,
            },
            None => PresenceMode::default(),
        }
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
        anyhow::ensure!(
            self.max_fragments_per_message >= 1,
            "max_fragments_per_message must be at least 1 (1: messages may not be fragmented)"
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
        // Missing while webhook_url is set: refused at start (`webhook::check_start`), so
        // each setting can still be checked alone.
        anyhow::ensure!(
            self.webhook_secret.is_empty() || self.webhook_secret.len() >= 32,
            "webhook_secret must be at least 32 bytes (it signs each webhook delivery)"
        );
        for url in &self.webhook_urls {
            anyhow::ensure!(
                url.starts_with("http://") && url.len() > "http://".len(),
                "webhook_url {url:?}: must be an http:// URL"
            );
        }
        for e in &self.webhook_events {
            anyhow::ensure!(
                WEBHOOK_EVENTS.contains(&e.as_str()),
                "webhook_events: unknown event {e:?} (known: {})",
                WEBHOOK_EVENTS.join(", ")
            );
        }
        anyhow::ensure!(
            (1..=10_000).contains(&self.webhook_batch_max),
            "webhook_batch_max must be between 1 and 10000"
        );
        anyhow::ensure!(
            self.webhook_queue_max >= 1,
            "webhook_queue_max must be at least 1"
        );
        anyhow::ensure!(
            self.webhook_timeout >= Duration::from_millis(10),
            "webhook_timeout must be at least 10ms"
        );
        anyhow::ensure!(self.max_boards >= 1, "max_boards must be at least 1");
        anyhow::ensure!(
            self.max_players_per_board >= 1,
            "max_players_per_board must be at least 1"
        );
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
            crate::topic::TopicPattern::parse(&ns.pattern)
                .map_err(|e| anyhow::anyhow!("namespace pattern: {e}"))?;
            anyhow::ensure!(
                ns.history_size <= 1_000_000,
                "namespace {:?}: history_size must be at most 1000000",
                ns.pattern
            );
            anyhow::ensure!(
                ns.presence || !ns.join_leave,
                "namespace {:?}: join_leave needs presence = true",
                ns.pattern
            );
        }
        anyhow::ensure!(
            self.history_size <= 1_000_000,
            "history_size must be at most 1000000"
        );
        Ok(())
    }
}

/// The shape of each log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields.message` and
    /// the event's other fields.
    Json,
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

impl SettingValue for LogFormat {
    const INVALID: Option<&'static str> = Some("xml");
    fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?} is not a log format (text or json)")),
        }
    }
    fn from_toml(v: toml::Value) -> Result<Self, String> {
        match v {
            toml::Value::String(s) => Self::parse(&s),
            other => Err(format!(
                "a log format is the string \"text\" or \"json\", not {}",
                other.type_str()
            )),
        }
    }
    fn show(&self) -> String {
        self.to_string()
    }
    fn to_toml(&self) -> toml::Value {
        toml::Value::String(self.to_string())
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
    fn fragment_cap_follows_max_message_bytes_unless_set() {
        let d = Config::resolve(&ServeArgs::default()).unwrap();
        assert_eq!(d.max_fragments_per_message, 1024);
        assert_eq!(Config::default().max_fragments_per_message, 1024);
        let big = Config::resolve(&ServeArgs {
            max_message_bytes: Some(16 * 1024 * 1024),
            queue_max_bytes: Some(64 * 1024 * 1024),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(big.max_fragments_per_message, 262_144);
        let small = Config::resolve(&ServeArgs {
            max_message_bytes: Some(16),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(small.max_fragments_per_message, 64);
        let set = Config::resolve(&ServeArgs {
            max_message_bytes: Some(16 * 1024 * 1024),
            queue_max_bytes: Some(64 * 1024 * 1024),
            max_fragments_per_message: Some(8),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(set.max_fragments_per_message, 8);
        assert!(Config::resolve(&ServeArgs {
            max_fragments_per_message: Some(0),
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
    fn namespace_patterns_follow_the_topic_pattern_rule() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crier.toml");
        for (pattern, ok) in [
            ("chat:*", true),
            ("*", true),
            ("news", true),
            ("a b*", false),
            ("a*b", false),
        ] {
            std::fs::write(&path, format!("[[namespace]]\npattern = \"{pattern}\"\n")).unwrap();
            let r = Config::resolve(&ServeArgs {
                config: Some(path.clone()),
                ..Default::default()
            });
            assert_eq!(r.is_ok(), ok, "{pattern}");
        }
    }

    #[test]
    fn origins_come_from_file_trimmed() {
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
    }
}
