//! One configuration tree: every setting a flag with a `CONFAB_*` env twin, validated before any
//! port is bound; backends are enums chosen once.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::limits::{LimitSettings, Quota};

#[derive(Debug, Parser)]
#[command(
    name = "confab-gateway",
    version,
    about = "Confab chat gateway: Socket.IO chat with persisted, sequenced messages"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve (the default when no command is given).
    Serve,
    /// Print a token signed with the configured secret (or the embedded dev secret).
    Token(TokenArgs),
    /// Ask a running gateway to drain (the Kubernetes preStop hook), optionally until it has.
    Drain(DrainArgs),
    /// Serve what the Socket.IO project's protocol test suites expect (socketio/engine.io-protocol
    /// at `/engine.io/`, socketio/socket.io-protocol at `/socket.io/`); for testing only.
    Conformance(ConformanceArgs),
}

#[derive(Debug, Args)]
pub struct ConformanceArgs {
    /// Where to listen; the suites expect 127.0.0.1:3000 (they call it localhost:3000).
    #[arg(long, default_value = "127.0.0.1:3000")]
    pub listen: std::net::SocketAddr,
}

#[derive(Debug, Args)]
pub struct DrainArgs {
    /// The gateway's address; defaults to CONFAB_LISTEN on this host.
    #[arg(long)]
    pub url: Option<String>,
    /// An admin token; by default one is minted with the configured secret.
    #[arg(long, env = "CONFAB_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Return only once every connection has been handed over.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// User id (the `sub` claim).
    #[arg(long)]
    pub sub: String,
    /// Display name; defaults to the user id.
    #[arg(long)]
    pub name: Option<String>,
    /// Role claim, repeatable: agent, admin.
    #[arg(long = "role")]
    pub roles: Vec<String>,
    /// Department claim, repeatable.
    #[arg(long = "department")]
    pub departments: Vec<String>,
    /// Lifetime, e.g. 30m, 1h, 7d.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BusKind {
    /// In-process: one gateway.
    Local,
    /// RabbitMQ (CONFAB_AMQP_URL): topic exchange `<prefix>.events`, one queue per gateway.
    Rabbitmq,
    /// Redis pub/sub (CONFAB_REDIS_URL).
    Redis,
}

/// Compression of `/ws` messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WsCompression {
    /// permessage-deflate (RFC 7692) when the client offers it.
    Deflate,
    Off,
}

/// Where attachment bytes are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttachmentsKind {
    /// Files under CONFAB_ATTACHMENTS_DIR (default DATA_DIR/attachments): one gateway, or a
    /// shared volume.
    Local,
    /// An S3-compatible bucket (CONFAB_S3_BUCKET, CONFAB_S3_ENDPOINT, …): a fleet.
    S3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Every setting, as flags and `CONFAB_*` variables.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on (port 0 picks a free port).
    #[arg(
        long,
        env = "CONFAB_LISTEN",
        default_value = "127.0.0.1:8080",
        global = true
    )]
    pub listen: SocketAddr,
    /// Directory for the embedded SQLite database and the dev secret.
    #[arg(
        long,
        env = "CONFAB_DATA_DIR",
        default_value = "./confab-data",
        global = true
    )]
    pub data_dir: PathBuf,
    /// sqlite://PATH (default: DATA_DIR/confab.db) or postgres://USER@HOST/DB for a fleet.
    #[arg(
        long,
        env = "CONFAB_DATABASE_URL",
        hide_env_values = true,
        global = true
    )]
    pub database_url: Option<String>,
    /// Postgres connections per gateway.
    #[arg(long, env = "CONFAB_DATABASE_POOL_SIZE", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1000), global = true)]
    pub database_pool_size: u32,
    /// Milliseconds a request waits for a Postgres connection before answering `unavailable`.
    #[arg(long, env = "CONFAB_DATABASE_TIMEOUT_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(100..), global = true)]
    pub database_timeout_ms: u64,
    /// redis://HOST:PORT: presence, typing, shared rate limits and the node registry live in
    /// Redis (and the bus too with CONFAB_BUS=redis).
    #[arg(long, env = "CONFAB_REDIS_URL", hide_env_values = true, global = true)]
    pub redis_url: Option<String>,
    /// amqp://USER:PASS@HOST:PORT/VHOST, for CONFAB_BUS=rabbitmq.
    #[arg(long, env = "CONFAB_AMQP_URL", hide_env_values = true, global = true)]
    pub amqp_url: Option<String>,
    /// Prefix of every Redis key and RabbitMQ exchange name, so fleets (and test runs)
    /// sharing one Redis or broker never see each other.
    #[arg(
        long,
        env = "CONFAB_BACKEND_PREFIX",
        default_value = "confab",
        global = true
    )]
    pub backend_prefix: String,
    /// This gateway's id in the fleet (default: generated); the pod name on Kubernetes.
    #[arg(long, env = "CONFAB_NODE_ID", global = true)]
    pub node_id: Option<String>,
    /// Milliseconds a connection stays online in Redis without a heartbeat: how soon the
    /// users of a crashed gateway go offline. Heartbeats run every third of it.
    #[arg(long, env = "CONFAB_PRESENCE_TTL_MS", default_value_t = 30000,
          value_parser = clap::value_parser!(u64).range(300..), global = true)]
    pub presence_ttl_ms: u64,
    /// Keep retrying unreachable backends at start-up instead of exiting.
    #[arg(long, env = "CONFAB_WAIT_FOR_BACKENDS", global = true)]
    pub wait_for_backends: bool,
    #[arg(
        long,
        env = "CONFAB_BUS",
        value_enum,
        default_value = "local",
        global = true
    )]
    pub bus: BusKind,
    /// HS256 secret (at least 32 bytes). Without it and without a public key: dev mode.
    #[arg(long, env = "CONFAB_JWT_SECRET", hide_env_values = true, global = true)]
    pub jwt_secret: Option<String>,
    /// Dev mode (no JWT key: anyone may mint tokens at `POST /api/dev/token`) on an address other
    /// than loopback. Without it, dev mode refuses to listen beyond this machine.
    #[arg(long, env = "CONFAB_DEV", default_value_t = false, global = true)]
    pub dev: bool,
    /// RS256 public key: PEM text or a path to a PEM file.
    #[arg(long, env = "CONFAB_JWT_PUBLIC_KEY", global = true)]
    pub jwt_public_key: Option<String>,
    /// Comma-separated exact origins allowed to open realtime connections
    /// (default: the gateway's own http://localhost:PORT and http://127.0.0.1:PORT).
    #[arg(
        long,
        env = "CONFAB_ALLOWED_ORIGINS",
        value_delimiter = ',',
        global = true
    )]
    pub allowed_origins: Vec<String>,
    /// Comma-separated proxy addresses whose X-Forwarded-For is trusted.
    #[arg(
        long,
        env = "CONFAB_TRUSTED_PROXIES",
        value_delimiter = ',',
        global = true
    )]
    pub trusted_proxies: Vec<IpAddr>,
    /// The drain window, in seconds: on SIGTERM, `POST /admin/drain` or the drain annotation,
    /// clients are told to reconnect elsewhere at moments spread over this window; whatever is
    /// left at its end is closed (1012).
    #[arg(long, env = "CONFAB_DRAIN_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(0..=3600), global = true)]
    pub drain_seconds: u64,
    /// A downward-API file of the pod's annotations; the gateway drains when it holds
    /// `confab.dev/drain="true"`.
    #[arg(long, env = "CONFAB_DRAIN_ANNOTATION_FILE", global = true)]
    pub drain_annotation_file: Option<PathBuf>,
    /// Largest WebSocket frame/message and polling body, in bytes.
    #[arg(long, env = "CONFAB_MAX_FRAME_BYTES", default_value_t = 65536,
          value_parser = clap::value_parser!(u64).range(1024..=16 * 1024 * 1024), global = true)]
    pub max_frame_bytes: u64,
    /// Largest message content, in bytes.
    #[arg(long, env = "CONFAB_MAX_CONTENT_BYTES", default_value_t = 16384,
          value_parser = clap::value_parser!(u64).range(1..=1024 * 1024), global = true)]
    pub max_content_bytes: u64,
    /// Messages per second per user (token bucket refill).
    #[arg(long, env = "CONFAB_MESSAGES_PER_SECOND", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub messages_per_second: u32,
    /// Burst of messages per user.
    #[arg(long, env = "CONFAB_MESSAGE_BURST", default_value_t = 40,
          value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub message_burst: u32,
    /// Events of any kind per second per connection.
    #[arg(long, env = "CONFAB_EVENTS_PER_SECOND", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub events_per_second: u32,
    /// Burst of events per connection.
    #[arg(long, env = "CONFAB_EVENT_BURST", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub event_burst: u32,
    /// New connections per second per client address.
    #[arg(long, env = "CONFAB_CONNECTS_PER_SECOND", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub connects_per_second: u32,
    /// Burst of new connections per client address.
    #[arg(long, env = "CONFAB_CONNECT_BURST", default_value_t = 200,
          value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub connect_burst: u32,
    /// HTTP API requests per second per user (token bucket refill).
    #[arg(long, env = "CONFAB_API_REQUESTS_PER_SECOND", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub api_requests_per_second: u32,
    /// Burst of HTTP API requests per user.
    #[arg(long, env = "CONFAB_API_REQUEST_BURST", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub api_request_burst: u32,
    /// Where attachment bytes are kept: local (a directory) or s3 (a bucket).
    #[arg(long, env = "CONFAB_ATTACHMENTS", value_enum, default_value_t = AttachmentsKind::Local, global = true)]
    pub attachments: AttachmentsKind,
    /// Directory of the local attachment store (default: DATA_DIR/attachments).
    #[arg(long, env = "CONFAB_ATTACHMENTS_DIR", global = true)]
    pub attachments_dir: Option<PathBuf>,
    /// Bucket of the s3 attachment store.
    #[arg(long, env = "CONFAB_S3_BUCKET", global = true)]
    pub s3_bucket: Option<String>,
    /// Endpoint of an S3-compatible service (http(s)://host:port); AWS itself when unset.
    #[arg(long, env = "CONFAB_S3_ENDPOINT", global = true)]
    pub s3_endpoint: Option<String>,
    /// Region of the bucket.
    #[arg(
        long,
        env = "CONFAB_S3_REGION",
        default_value = "us-east-1",
        global = true
    )]
    pub s3_region: String,
    /// Access key id; unset, the AWS environment is asked (AWS_ACCESS_KEY_ID, web identity, …).
    #[arg(
        long,
        env = "CONFAB_S3_ACCESS_KEY_ID",
        hide_env_values = true,
        global = true
    )]
    pub s3_access_key_id: Option<String>,
    /// Secret access key, with CONFAB_S3_ACCESS_KEY_ID.
    #[arg(
        long,
        env = "CONFAB_S3_SECRET_ACCESS_KEY",
        hide_env_values = true,
        global = true
    )]
    pub s3_secret_access_key: Option<String>,
    /// Largest attachment, in bytes (uploads past it: 413 too_large before the body is read).
    #[arg(long, env = "CONFAB_MAX_ATTACHMENT_BYTES", default_value_t = 10 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1..=1024 * 1024 * 1024), global = true)]
    pub max_attachment_bytes: u64,
    /// Attachment types accepted, comma-separated, as sniffed from the bytes.
    #[arg(
        long,
        env = "CONFAB_ATTACHMENT_TYPES",
        value_delimiter = ',',
        global = true,
        default_value = "image/png,image/jpeg,image/gif,image/webp,application/pdf,text/plain,application/zip,application/octet-stream"
    )]
    pub attachment_types: Vec<String>,
    /// Milliseconds a client has to send a whole request head, from the connection's start or
    /// from the moment a kept-alive connection goes idle (slowloris).
    #[arg(long, env = "CONFAB_HTTP_HEADER_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..), global = true)]
    pub http_header_timeout_ms: u64,
    /// Milliseconds a request body has to arrive, from its head; past it: 408 and the close.
    #[arg(long, env = "CONFAB_HTTP_BODY_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..), global = true)]
    pub http_body_timeout_ms: u64,
    /// Milliseconds an attachment upload's body has to arrive, from its head (uploads only:
    /// 10 MiB from a phone takes longer than CONFAB_HTTP_BODY_TIMEOUT_MS allows).
    #[arg(long, env = "CONFAB_HTTP_UPLOAD_TIMEOUT_MS", default_value_t = 300_000,
          value_parser = clap::value_parser!(u64).range(100..), global = true)]
    pub http_upload_timeout_ms: u64,
    /// Milliseconds an HTTP connection may sit with no request in flight before it is closed.
    #[arg(long, env = "CONFAB_HTTP_IDLE_TIMEOUT_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(100..), global = true)]
    pub http_idle_timeout_ms: u64,
    /// Open connections on this gateway; past it new ones get 503 + Retry-After (default: what
    /// the file descriptor limit allows, less 128 kept for the gateway itself).
    #[arg(long, env = "CONFAB_MAX_CONNECTIONS",
          value_parser = clap::value_parser!(u64).range(1..), global = true)]
    pub max_connections: Option<u64>,
    /// Open connections from one client address (trusted proxies excepted); past it: 503.
    #[arg(long, env = "CONFAB_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = 512,
          value_parser = clap::value_parser!(u64).range(1..), global = true)]
    pub max_connections_per_address: u64,
    /// Outgoing packets queued per connection before a slow reader is disconnected.
    #[arg(long, env = "CONFAB_SEND_QUEUE", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(8..=65536), global = true)]
    pub send_queue: u64,
    /// Milliseconds between server pings on realtime connections (both transports).
    #[arg(long, env = "CONFAB_PING_INTERVAL_MS", default_value_t = 25_000,
          value_parser = clap::value_parser!(u64).range(100..), global = true)]
    pub ping_interval_ms: u64,
    /// Milliseconds to wait for the answer to a ping before the connection is closed.
    #[arg(long, env = "CONFAB_PING_TIMEOUT_MS", default_value_t = 20_000,
          value_parser = clap::value_parser!(u64).range(100..), global = true)]
    pub ping_timeout_ms: u64,
    /// Milliseconds a `/ws` client without a token in the URL or header has to send its `auth`
    /// frame.
    #[arg(long, env = "CONFAB_WS_AUTH_TIMEOUT_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(100..), global = true)]
    pub ws_auth_timeout_ms: u64,
    /// Milliseconds a client (`/ws` or Socket.IO) may leave its socket unread with frames waiting
    /// before it is disconnected.
    #[arg(long, env = "CONFAB_WS_SEND_DEADLINE_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..), global = true)]
    pub ws_send_deadline_ms: u64,
    /// permessage-deflate on `/ws` for messages over 1 KiB, when the client offers it.
    #[arg(
        long,
        env = "CONFAB_WS_COMPRESSION",
        value_enum,
        default_value = "deflate",
        global = true
    )]
    pub ws_compression: WsCompression,
    /// Serve `/ws/echo`, an echo endpoint with the `/ws` WebSocket settings, for the
    /// Autobahn|Testsuite. Never on in production.
    #[arg(
        long,
        env = "CONFAB_WS_ECHO_ROUTE",
        default_value_t = false,
        global = true
    )]
    pub ws_echo_route: bool,
    /// Milliseconds a user stays online after their last connection closes.
    #[arg(
        long,
        env = "CONFAB_PRESENCE_GRACE_MS",
        default_value_t = 3000,
        global = true
    )]
    pub presence_grace_ms: u64,
    /// Seconds before `exp` that `token_expiring` is sent.
    #[arg(
        long,
        env = "CONFAB_TOKEN_WARNING_SECONDS",
        default_value_t = 60,
        global = true
    )]
    pub token_warning_seconds: u64,
    #[arg(
        long,
        env = "CONFAB_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    /// OTLP/HTTP (protobuf) collector base URL, e.g. `http://otel-collector:4318`: metrics are
    /// pushed to `<url>/v1/metrics` and spans to `<url>/v1/traces`. Unset: no OTLP export.
    #[arg(long, env = "CONFAB_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
    /// Record metrics (`/metrics`, OTLP). `false` turns every instrument into a no-op, to
    /// measure their cost.
    #[arg(
        long,
        env = "CONFAB_METRICS",
        default_value_t = true,
        action = clap::ArgAction::Set,
        global = true
    )]
    pub metrics: bool,
}

/// A checked OTLP/HTTP collector base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpEndpoint(String);

impl OtlpEndpoint {
    /// `http://host[:port][/path]`: the signal paths `/v1/metrics` and `/v1/traces` are added to it.
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        let setting = "CONFAB_OTLP_ENDPOINT";
        let uri: axum::http::Uri = url.parse().map_err(|e| {
            bad(
                setting,
                format!("{url:?} is not a URL like http://otel-collector:4318 ({e})"),
            )
        })?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(bad(
                    setting,
                    "https is not built in; point it at a collector's plain OTLP/HTTP port (4318), e.g. a node-local or sidecar collector",
                ));
            }
            _ => {
                return Err(bad(
                    setting,
                    format!("{url:?} must start with http://, e.g. http://otel-collector:4318"),
                ));
            }
        }
        if uri.host().is_none_or(str::is_empty) || uri.query().is_some() {
            return Err(bad(
                setting,
                format!(
                    "{url:?} must be a base URL with a host and no query, e.g. http://otel-collector:4318"
                ),
            ));
        }
        Ok(Self(url.trim_end_matches('/').to_owned()))
    }

    /// The URL of one signal: `metrics` or `traces`.
    pub fn signal_url(&self, signal: &str) -> String {
        format!("{}/v1/{signal}", self.0)
    }
}

/// Where messages are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreBackend {
    SqliteFile(PathBuf),
    SqliteMemory,
    Postgres(String),
}

/// Where presence, typing, rate limits and the node registry live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedStateBackend {
    /// In this process: one gateway.
    Memory,
    /// In Redis at this URL: a fleet.
    Redis(String),
}

/// Which bus carries events between gateways, with its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusBackend {
    Local,
    Rabbitmq(String),
    Redis(String),
}

/// Where attachment bytes go, with what that needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachmentsBackend {
    Local(PathBuf),
    S3(crate::attachments::S3Settings),
}

/// Types a browser would run as a page or script: never accepted, whatever the list says.
const ACTIVE_TYPES: &[&str] = &[
    "text/html",
    "image/svg+xml",
    "text/xml",
    "application/xhtml+xml",
    "text/javascript",
    "application/javascript",
];

/// How tokens are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtKey {
    Secret(Vec<u8>),
    PublicKeyPem(Vec<u8>),
    /// No key configured: a secret generated once and kept in the data directory.
    DevSecret(PathBuf),
}

/// A setting that stops start-up, with the one line that names it.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {setting}: {problem}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub problem: String,
}

fn bad(setting: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        setting,
        problem: problem.into(),
    }
}

/// `30s`, `15m`, `1h`, `7d`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30m, 1h or 7d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("{s:?} has an unknown unit; use s, m, h or d")),
    };
    if secs == 0 {
        return Err("the duration must be positive".into());
    }
    Ok(Duration::from_secs(secs))
}

impl Config {
    /// Settings for tests: a private in-memory database, a fixed secret, port 0.
    pub fn for_test() -> Self {
        let mut c = Cli::parse_from(["confab-gateway"]).config;
        c.listen = "127.0.0.1:0".parse().expect("literal address");
        c.database_url = Some("sqlite::memory:".into());
        c.jwt_secret = Some("test-secret-test-secret-test-secret!".into());
        c.presence_grace_ms = 200;
        // Never the working directory's ./confab-data: a private directory per test config.
        c.attachments_dir = Some(
            std::env::temp_dir().join(format!("confab-test-attachments-{}", uuid::Uuid::now_v7())),
        );
        c
    }

    pub fn store(&self) -> Result<StoreBackend, ConfigError> {
        let Some(url) = &self.database_url else {
            return Ok(StoreBackend::SqliteFile(self.data_dir.join("confab.db")));
        };
        if url == "sqlite::memory:" {
            return Ok(StoreBackend::SqliteMemory);
        }
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            let path = path.split('?').next().unwrap_or_default();
            if path.is_empty() {
                return Err(bad(
                    "CONFAB_DATABASE_URL",
                    "sqlite:// needs a file path, e.g. sqlite://./confab-data/confab.db",
                ));
            }
            return Ok(StoreBackend::SqliteFile(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(StoreBackend::Postgres(url.clone()));
        }
        let scheme = url.split(':').next().unwrap_or_default();
        Err(bad(
            "CONFAB_DATABASE_URL",
            format!(
                "unsupported scheme {scheme:?}; use sqlite://PATH, sqlite::memory: or postgres://USER@HOST/DB"
            ),
        ))
    }

    pub fn attachments_backend(&self) -> Result<AttachmentsBackend, ConfigError> {
        match self.attachments {
            AttachmentsKind::Local => Ok(AttachmentsBackend::Local(
                self.attachments_dir
                    .clone()
                    .unwrap_or_else(|| self.data_dir.join("attachments")),
            )),
            AttachmentsKind::S3 => {
                let bucket = self
                    .s3_bucket
                    .clone()
                    .filter(|b| !b.trim().is_empty())
                    .ok_or_else(|| {
                        bad("CONFAB_S3_BUCKET", "CONFAB_ATTACHMENTS=s3 needs a bucket")
                    })?;
                if let Some(endpoint) = &self.s3_endpoint
                    && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
                {
                    return Err(bad(
                        "CONFAB_S3_ENDPOINT",
                        format!("{endpoint:?} is not a URL like https://s3.example.com:9000"),
                    ));
                }
                if self.s3_access_key_id.is_some() != self.s3_secret_access_key.is_some() {
                    return Err(bad(
                        "CONFAB_S3_SECRET_ACCESS_KEY",
                        "set both CONFAB_S3_ACCESS_KEY_ID and CONFAB_S3_SECRET_ACCESS_KEY, or neither",
                    ));
                }
                Ok(AttachmentsBackend::S3(crate::attachments::S3Settings {
                    bucket,
                    endpoint: self.s3_endpoint.clone(),
                    region: self.s3_region.clone(),
                    access_key_id: self.s3_access_key_id.clone(),
                    secret_access_key: self.s3_secret_access_key.clone(),
                }))
            }
        }
    }

    /// The accepted attachment types, each `type/subtype`, none a browser would run.
    pub fn attachment_types(&self) -> Result<Vec<String>, ConfigError> {
        let mut types = Vec::new();
        for t in &self.attachment_types {
            let t = t.trim().to_ascii_lowercase();
            let well_formed = t.split_once('/').is_some_and(|(a, b)| {
                !a.is_empty()
                    && !b.is_empty()
                    && t.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "/+-.".contains(c))
            });
            if !well_formed {
                return Err(bad(
                    "CONFAB_ATTACHMENT_TYPES",
                    format!("{t:?} is not a content type like image/png"),
                ));
            }
            if ACTIVE_TYPES.contains(&t.as_str()) {
                return Err(bad(
                    "CONFAB_ATTACHMENT_TYPES",
                    format!("{t} would run in a browser and is never accepted"),
                ));
            }
            types.push(t);
        }
        if types.is_empty() {
            return Err(bad("CONFAB_ATTACHMENT_TYPES", "name at least one type"));
        }
        Ok(types)
    }

    pub fn shared_state(&self) -> Result<SharedStateBackend, ConfigError> {
        match &self.redis_url {
            None => Ok(SharedStateBackend::Memory),
            Some(url) if url.starts_with("redis://") || url.starts_with("rediss://") => {
                Ok(SharedStateBackend::Redis(url.clone()))
            }
            Some(_) => Err(bad(
                "CONFAB_REDIS_URL",
                "must look like redis://HOST:PORT or rediss://HOST:PORT",
            )),
        }
    }

    pub fn bus_backend(&self) -> Result<BusBackend, ConfigError> {
        match self.bus {
            BusKind::Local => Ok(BusBackend::Local),
            BusKind::Rabbitmq => match &self.amqp_url {
                Some(url) if url.starts_with("amqp://") || url.starts_with("amqps://") => {
                    Ok(BusBackend::Rabbitmq(url.clone()))
                }
                Some(_) => Err(bad(
                    "CONFAB_AMQP_URL",
                    "must look like amqp://USER:PASS@HOST:PORT/VHOST",
                )),
                None => Err(bad(
                    "CONFAB_AMQP_URL",
                    "CONFAB_BUS=rabbitmq needs the broker's address",
                )),
            },
            BusKind::Redis => match self.shared_state()? {
                SharedStateBackend::Redis(url) => Ok(BusBackend::Redis(url)),
                SharedStateBackend::Memory => Err(bad(
                    "CONFAB_REDIS_URL",
                    "CONFAB_BUS=redis needs the Redis address",
                )),
            },
        }
    }

    pub fn jwt(&self) -> Result<JwtKey, ConfigError> {
        match (&self.jwt_secret, &self.jwt_public_key) {
            (Some(_), Some(_)) => Err(bad(
                "CONFAB_JWT_SECRET",
                "set either CONFAB_JWT_SECRET or CONFAB_JWT_PUBLIC_KEY, not both",
            )),
            (Some(secret), None) if secret.len() < 32 => Err(bad(
                "CONFAB_JWT_SECRET",
                format!("must be at least 32 bytes (got {})", secret.len()),
            )),
            (Some(secret), None) => Ok(JwtKey::Secret(secret.as_bytes().to_vec())),
            (None, Some(key)) => {
                let pem = if key.contains("-----BEGIN") {
                    key.as_bytes().to_vec()
                } else {
                    std::fs::read(key).map_err(|e| {
                        bad("CONFAB_JWT_PUBLIC_KEY", format!("cannot read {key:?}: {e}"))
                    })?
                };
                Ok(JwtKey::PublicKeyPem(pem))
            }
            (None, None) => Ok(JwtKey::DevSecret(self.data_dir.join("dev-jwt-secret"))),
        }
    }

    pub fn origins(&self) -> Result<Vec<String>, ConfigError> {
        for o in &self.allowed_origins {
            let ok = (o.starts_with("http://") || o.starts_with("https://"))
                && !o.ends_with('/')
                && !o[o.find("//").map_or(0, |i| i + 2)..].contains('/');
            if !ok {
                return Err(bad(
                    "CONFAB_ALLOWED_ORIGINS",
                    format!(
                        "{o:?} is not an origin like https://chat.example.com (scheme://host[:port], no path)"
                    ),
                ));
            }
        }
        Ok(self.allowed_origins.clone())
    }

    pub fn limits(&self) -> LimitSettings {
        LimitSettings {
            user_messages: Quota {
                per_second: self.messages_per_second,
                burst: self.message_burst,
            },
            connection_events: Quota {
                per_second: self.events_per_second,
                burst: self.event_burst,
            },
            user_joins: Quota {
                per_second: self.events_per_second,
                burst: self.event_burst,
            },
            address_connects: Quota {
                per_second: self.connects_per_second,
                burst: self.connect_burst,
            },
            user_requests: Quota {
                per_second: self.api_requests_per_second,
                burst: self.api_request_burst,
            },
        }
    }

    /// Where OTLP telemetry goes, if anywhere.
    pub fn otlp(&self) -> Result<Option<OtlpEndpoint>, ConfigError> {
        self.otlp_endpoint
            .as_deref()
            .filter(|s| !s.trim().is_empty())
            .map(OtlpEndpoint::parse)
            .transpose()
    }

    /// Checks every setting that clap cannot, so start-up fails before binding anything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.otlp()?;
        self.store()?;
        self.attachments_backend()?;
        self.attachment_types()?;
        self.shared_state()?;
        self.bus_backend()?;
        if self.backend_prefix.is_empty()
            || !self
                .backend_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(bad(
                "CONFAB_BACKEND_PREFIX",
                "use letters, digits, '-', '_' or '.'",
            ));
        }
        if self.presence_grace_ms >= self.presence_ttl_ms {
            return Err(bad(
                "CONFAB_PRESENCE_TTL_MS",
                format!(
                    "{} must exceed CONFAB_PRESENCE_GRACE_MS={}",
                    self.presence_ttl_ms, self.presence_grace_ms
                ),
            ));
        }
        if matches!(self.jwt()?, JwtKey::DevSecret(_))
            && !self.listen.ip().is_loopback()
            && !self.dev
        {
            return Err(bad(
                "CONFAB_LISTEN",
                format!(
                    "{} is not a loopback address, and without CONFAB_JWT_SECRET or CONFAB_JWT_PUBLIC_KEY this is dev mode, where anyone can mint tokens; set a key, listen on 127.0.0.1, or pass --dev (CONFAB_DEV=true) to serve dev mode there anyway",
                    self.listen
                ),
            ));
        }
        self.origins()?;
        if self.http_idle_timeout_ms > self.http_header_timeout_ms {
            return Err(bad(
                "CONFAB_HTTP_IDLE_TIMEOUT_MS",
                format!(
                    "{} exceeds CONFAB_HTTP_HEADER_TIMEOUT_MS={}, which already ends an idle connection",
                    self.http_idle_timeout_ms, self.http_header_timeout_ms
                ),
            ));
        }
        if self.max_content_bytes + 1024 > self.max_frame_bytes {
            return Err(bad(
                "CONFAB_MAX_CONTENT_BYTES",
                format!(
                    "{} does not fit in a frame of CONFAB_MAX_FRAME_BYTES={} with room for the envelope (1 KiB)",
                    self.max_content_bytes, self.max_frame_bytes
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        let mut all = vec!["confab-gateway"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).expect("parses").config
    }

    #[test]
    fn no_arguments_means_embedded_defaults_in_confab_data() {
        let c = parse(&[]);
        assert_eq!(
            c.store().expect("store"),
            StoreBackend::SqliteFile(PathBuf::from("./confab-data/confab.db"))
        );
        assert_eq!(
            c.jwt().expect("jwt"),
            JwtKey::DevSecret(PathBuf::from("./confab-data/dev-jwt-secret"))
        );
        assert_eq!(c.bus, BusKind::Local);
        c.validate().expect("defaults are valid");
    }

    #[test]
    fn bad_settings_are_named_in_one_line() {
        let e = parse(&["--database-url", "mysql://x"])
            .validate()
            .expect_err("mysql is refused");
        assert_eq!(e.setting, "CONFAB_DATABASE_URL");
        assert!(!e.to_string().contains('\n'));
        let e = parse(&["--jwt-secret", "short"])
            .validate()
            .expect_err("short secret");
        assert_eq!(e.setting, "CONFAB_JWT_SECRET");
        let e = parse(&[
            "--allowed-origins",
            "https://ok.example,https://bad.example/path",
        ])
        .validate()
        .expect_err("origin with a path");
        assert!(e.to_string().contains("bad.example/path"));
        let e = parse(&["--bus", "rabbitmq"])
            .validate()
            .expect_err("rabbitmq without a URL");
        assert_eq!(e.setting, "CONFAB_AMQP_URL");
        let e = parse(&["--bus", "redis"])
            .validate()
            .expect_err("redis bus without a URL");
        assert_eq!(e.setting, "CONFAB_REDIS_URL");
        let e = parse(&["--redis-url", "http://x"])
            .validate()
            .expect_err("not a redis URL");
        assert_eq!(e.setting, "CONFAB_REDIS_URL");
        let e = parse(&["--backend-prefix", "a b"])
            .validate()
            .expect_err("prefix with a space");
        assert_eq!(e.setting, "CONFAB_BACKEND_PREFIX");
        assert!(Cli::try_parse_from(["confab-gateway", "--listen", "nowhere"]).is_err());
        assert!(Cli::try_parse_from(["confab-gateway", "--max-frame-bytes", "10"]).is_err());
    }

    #[test]
    fn attachments_default_to_the_data_dir_and_bad_settings_are_named() {
        let c = parse(&[]);
        assert_eq!(
            c.attachments_backend().expect("default"),
            AttachmentsBackend::Local(PathBuf::from("./confab-data/attachments"))
        );
        assert_eq!(c.max_attachment_bytes, 10 * 1024 * 1024);
        assert!(
            c.attachment_types()
                .expect("types")
                .contains(&"image/png".to_owned())
        );
        let e = parse(&["--attachments", "s3"])
            .validate()
            .expect_err("no bucket");
        assert_eq!(e.setting, "CONFAB_S3_BUCKET");
        let e = parse(&[
            "--attachments",
            "s3",
            "--s3-bucket",
            "b",
            "--s3-endpoint",
            "minio:9000",
        ])
        .validate()
        .expect_err("no scheme");
        assert_eq!(e.setting, "CONFAB_S3_ENDPOINT");
        let e = parse(&[
            "--attachments",
            "s3",
            "--s3-bucket",
            "b",
            "--s3-access-key-id",
            "k",
        ])
        .validate()
        .expect_err("half the credentials");
        assert_eq!(e.setting, "CONFAB_S3_SECRET_ACCESS_KEY");
        let e = parse(&["--attachment-types", "image/png,text/html"])
            .validate()
            .expect_err("html");
        assert_eq!(e.setting, "CONFAB_ATTACHMENT_TYPES");
        assert!(e.to_string().contains("text/html"), "{e}");
        let e = parse(&["--attachment-types", "png"])
            .validate()
            .expect_err("not a type");
        assert_eq!(e.setting, "CONFAB_ATTACHMENT_TYPES");
        assert!(!e.to_string().contains('\n'));
        assert!(Cli::try_parse_from(["confab-gateway", "--max-attachment-bytes", "0"]).is_err());
        assert!(Cli::try_parse_from(["confab-gateway", "--attachments", "ftp"]).is_err());
        let s3 = parse(&[
            "--attachments",
            "s3",
            "--s3-bucket",
            "confab",
            "--s3-endpoint",
            "http://minio:9000",
        ]);
        s3.validate().expect("valid");
        assert!(matches!(
            s3.attachments_backend().expect("s3"),
            AttachmentsBackend::S3(settings) if settings.bucket == "confab" && settings.region == "us-east-1"
        ));
    }

    #[test]
    fn dev_mode_serves_only_on_loopback_unless_dev_is_given() {
        for loopback in ["127.0.0.1:8080", "[::1]:8080"] {
            parse(&["--listen", loopback])
                .validate()
                .expect("dev mode on loopback");
        }
        for open in ["0.0.0.0:8080", "[::]:8080", "192.0.2.10:8080"] {
            let e = parse(&["--listen", open])
                .validate()
                .expect_err("dev mode beyond loopback");
            assert_eq!(e.setting, "CONFAB_LISTEN", "{open}");
            assert!(e.to_string().contains("--dev"), "{e}");
            assert!(!e.to_string().contains('\n'));
            parse(&["--listen", open, "--dev"])
                .validate()
                .expect("--dev accepts it");
            parse(&[
                "--listen",
                open,
                "--jwt-secret",
                "a-real-secret-a-real-secret-a-real-secret",
            ])
            .validate()
            .expect("not dev mode with a key");
        }
    }

    #[test]
    fn a_fleet_is_configured_by_urls() {
        let c = parse(&[
            "--database-url",
            "postgres://postgres@127.0.0.1/confab",
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--amqp-url",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "--bus",
            "rabbitmq",
        ]);
        c.validate().expect("valid");
        assert_eq!(
            c.store().expect("store"),
            StoreBackend::Postgres("postgres://postgres@127.0.0.1/confab".into())
        );
        assert_eq!(
            c.shared_state().expect("shared"),
            SharedStateBackend::Redis("redis://127.0.0.1:6379".into())
        );
        assert_eq!(
            c.bus_backend().expect("bus"),
            BusBackend::Rabbitmq("amqp://guest:guest@127.0.0.1:5672/%2f".into())
        );
        let mut redis_bus = c.clone();
        redis_bus.bus = BusKind::Redis;
        assert_eq!(
            redis_bus.bus_backend().expect("bus"),
            BusBackend::Redis("redis://127.0.0.1:6379".into())
        );
    }

    #[test]
    fn the_otlp_endpoint_is_a_plain_http_base_url_named_when_wrong() {
        let c = parse(&["--otlp-endpoint", "http://collector:4318/"]);
        c.validate().expect("valid");
        let endpoint = c.otlp().expect("valid").expect("set");
        assert_eq!(
            endpoint.signal_url("metrics"),
            "http://collector:4318/v1/metrics"
        );
        assert_eq!(parse(&[]).otlp().expect("unset is fine"), None);
        for wrong in [
            "collector:4318",
            "https://collector:4318",
            "http://",
            "not a url",
            "http://c:4318/?x=1",
        ] {
            let e = parse(&["--otlp-endpoint", wrong])
                .validate()
                .expect_err(wrong);
            assert_eq!(e.setting, "CONFAB_OTLP_ENDPOINT", "{wrong}");
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }

    #[test]
    fn metrics_are_on_unless_switched_off() {
        assert!(parse(&[]).metrics);
        assert!(!parse(&["--metrics", "false"]).metrics);
        assert!(Cli::try_parse_from(["confab-gateway", "--metrics", "maybe"]).is_err());
    }

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604800)));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
