//! Wires configuration to backends, the chat service and the router; serves until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use base64::Engine;
use thiserror::Error;
use tokio::net::TcpListener;

use crate::attachments::{AttachmentError, AttachmentStore, LocalAttachments, S3Attachments};
use crate::auth::{Authenticator, KeyError};
use crate::bus::{Bus, LocalBus, RabbitBus, RabbitSettings, RedisBus};
use crate::chat::attachments::{AttachmentSettings, Attachments};
use crate::chat::{ChatService, ChatSettings};
use crate::config::{
    AttachmentsBackend, BusBackend, Config, ConfigError, JwtKey, SharedStateBackend, StoreBackend,
};
use crate::drain::{Drain, DrainState};
use crate::limits::{Limits, MemoryLimits, RedisLimits};
use crate::presence::{MemoryPresence, Presence, RedisPresence, RedisPresenceSettings};
use crate::server::{self, Caps, ServerSettings};
use crate::store::{PostgresStore, SqliteStore, Store, StoreError};
use crate::telemetry::instrumented::{
    InstrumentedBus, InstrumentedLimits, InstrumentedPresence, InstrumentedStore,
};
use crate::telemetry::{self, TelemetryError};
use crate::transport::origin::{self, OriginPolicy};
use crate::transport::{Gateway, TransportSettings, engineio, http, web, ws};

#[derive(Debug, Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot open the attachment store ({setting}): {source}")]
    Attachments {
        setting: &'static str,
        source: AttachmentError,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    /// One line naming the backend and its setting.
    #[error(
        "cannot reach {backend} ({setting}): {reason}; start it, fix the setting, or set CONFAB_WAIT_FOR_BACKENDS=true to wait for it"
    )]
    Unreachable {
        backend: &'static str,
        setting: &'static str,
        reason: String,
    },
    #[error("{0}")]
    Descriptors(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

/// Connects to one backend: at once (one clear line when it is unreachable), or, when told to
/// wait, retrying with backoff until it answers.
async fn reach<T, E, F, Fut>(
    backend: &'static str,
    setting: &'static str,
    wait: bool,
    mut connect: F,
) -> Result<T, AppError>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Duration::from_millis(200);
    loop {
        let reason = match tokio::time::timeout(Duration::from_secs(15), connect()).await {
            Ok(Ok(connected)) => return Ok(connected),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer within 15 s".to_owned(),
        };
        let reason = reason.split_whitespace().collect::<Vec<_>>().join(" ");
        if !wait {
            return Err(AppError::Unreachable {
                backend,
                setting,
                reason,
            });
        }
        tracing::warn!(backend, %reason, retry_in_ms = backoff.as_millis() as u64, "waiting for a backend");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// A built gateway, ready to serve.
pub struct App {
    pub router: Router,
    /// The Engine.IO server behind `/socket.io/`: its sessions are closed at shutdown.
    pub engine: Arc<engineio::Engine>,
    pub gateway: Arc<Gateway>,
    /// Set when running on the generated dev secret: tokens may be minted for the newcomer.
    pub dev_secret_path: Option<std::path::PathBuf>,
    /// Timeouts and caps of the HTTP server.
    pub server: ServerSettings,
}

/// Reads the dev secret, generating it on first start.
fn dev_secret(path: &Path) -> Result<Vec<u8>, AppError> {
    let io = |context: String| move |source| AppError::Io { context, source };
    if let Ok(existing) = std::fs::read_to_string(path) {
        let secret = existing.trim().as_bytes().to_vec();
        if secret.len() >= 32 {
            return Ok(secret);
        }
    }
    if let Some(dir) = path.parent() {
        private_dir(dir)?;
    }
    let bytes: [u8; 32] = rand::random();
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(io(format!("cannot write {}", path.display())))?;
        f.write_all(secret.as_bytes())
            .map_err(io(format!("cannot write {}", path.display())))?;
    }
    Ok(secret.into_bytes())
}

/// Creates `dir` (and its parents) if missing, the last one readable by this user only.
fn private_dir(dir: &Path) -> Result<(), AppError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| AppError::Io {
            context: format!("cannot create {}", dir.display()),
            source,
        })
}

/// The SQLite file, readable and writable by this user only (mode 0600), created so if missing
/// and tightened if it exists: it holds every message. SQLite gives its `-wal` and `-shm` files
/// the database file's mode.
fn private_file(path: &Path) -> Result<(), AppError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |source| AppError::Io {
        context: format!("cannot create {} with mode 0600", path.display()),
        source,
    };
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)
}

/// The authenticator for the configured key, and where the dev secret lives if that is in use.
pub fn authenticator(
    config: &Config,
) -> Result<(Authenticator, Option<std::path::PathBuf>), AppError> {
    Ok(match config.jwt()? {
        JwtKey::Secret(s) => (Authenticator::with_secret(&s)?, None),
        JwtKey::PublicKeyPem(pem) => (Authenticator::with_public_key(&pem)?, None),
        JwtKey::DevSecret(path) => (Authenticator::with_secret(&dev_secret(&path)?)?, Some(path)),
    })
}

impl App {
    /// Builds backends and routes. `local` is the bound address, for the default origin list.
    pub async fn build(config: &Config, local: SocketAddr) -> Result<Self, AppError> {
        config.validate()?;
        let server = ServerSettings {
            header_timeout: Duration::from_millis(config.http_header_timeout_ms),
            body_timeout: Duration::from_millis(config.http_body_timeout_ms),
            upload_timeout: Duration::from_millis(config.http_upload_timeout_ms),
            idle_timeout: Duration::from_millis(config.http_idle_timeout_ms),
            max_connections: server::connection_cap(
                config.max_connections,
                server::descriptor_limit(),
            )
            .map_err(AppError::Descriptors)?,
            max_connections_per_address: config.max_connections_per_address as usize,
            trusted_proxies: config.trusted_proxies.clone(),
        };
        let (auth, dev_secret_path) = authenticator(config)?;
        let wait = config.wait_for_backends;
        let node_id = config
            .node_id
            .clone()
            .unwrap_or_else(|| ChatSettings::default().node_id);
        let metrics = telemetry::build_metrics(config.metrics, config.otlp()?.as_ref(), &node_id)?;
        let store: Arc<dyn Store> = match config.store()? {
            StoreBackend::SqliteFile(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    private_dir(dir)?;
                }
                private_file(&path)?;
                Arc::new(SqliteStore::open(&path).await?)
            }
            StoreBackend::SqliteMemory => Arc::new(SqliteStore::in_memory().await?),
            StoreBackend::Postgres(url) => {
                let timeout = Duration::from_millis(config.database_timeout_ms);
                let pool_size = config.database_pool_size;
                Arc::new(
                    reach("Postgres", "CONFAB_DATABASE_URL", wait, || {
                        PostgresStore::connect(&url, pool_size, timeout)
                    })
                    .await?,
                )
            }
        };
        let prefix = config.backend_prefix.clone();
        let bus: Arc<dyn Bus> = match config.bus_backend()? {
            BusBackend::Local => Arc::new(LocalBus::new()),
            BusBackend::Rabbitmq(url) => {
                let settings = RabbitSettings {
                    url,
                    prefix: prefix.clone(),
                    node_id: node_id.clone(),
                };
                Arc::new(
                    reach("RabbitMQ", "CONFAB_AMQP_URL", wait, || {
                        RabbitBus::connect(settings.clone())
                    })
                    .await?,
                )
            }
            BusBackend::Redis(url) => Arc::new(
                reach("Redis", "CONFAB_REDIS_URL", wait, || {
                    RedisBus::connect(&url, &prefix, &node_id)
                })
                .await?,
            ),
        };
        let (presence, limits): (Arc<dyn Presence>, Arc<dyn Limits>) =
            match config.shared_state()? {
                SharedStateBackend::Memory => {
                    let limits = Arc::new(MemoryLimits::new(config.limits()));
                    limits.spawn_housekeeping();
                    (Arc::new(MemoryPresence::new()), limits)
                }
                SharedStateBackend::Redis(url) => {
                    let settings = RedisPresenceSettings {
                        url: url.clone(),
                        prefix: prefix.clone(),
                        node_id: node_id.clone(),
                        address: format!("http://{local}"),
                        ttl: Duration::from_millis(config.presence_ttl_ms),
                    };
                    let presence = reach("Redis", "CONFAB_REDIS_URL", wait, || {
                        RedisPresence::connect(settings.clone())
                    })
                    .await?;
                    let limits = reach("Redis", "CONFAB_REDIS_URL", wait, || {
                        RedisLimits::connect(&url, &prefix, config.limits())
                    })
                    .await?
                    .with_metrics(metrics.clone());
                    (Arc::new(presence), Arc::new(limits))
                }
            };
        let settings = ChatSettings {
            node_id,
            presence_grace: Duration::from_millis(config.presence_grace_ms),
            max_content_bytes: config.max_content_bytes as usize,
            ..ChatSettings::default()
        };
        // Timing every backend call costs a clock read or two: only when metrics are on.
        let (store, bus, presence, limits) = if metrics.enabled() {
            (
                InstrumentedStore::wrap(store, metrics.clone()),
                InstrumentedBus::wrap(bus, metrics.clone()),
                InstrumentedPresence::wrap(presence, metrics.clone()),
                InstrumentedLimits::wrap(limits, metrics.clone()),
            )
        } else {
            (store, bus, presence, limits)
        };
        let service =
            ChatService::with_metrics(store, bus, presence, limits, settings, metrics.clone());
        service.spawn_presence_upkeep();
        let objects: Arc<dyn AttachmentStore> = match config.attachments_backend()? {
            AttachmentsBackend::Local(dir) => {
                Arc::new(LocalAttachments::open(&dir).await.map_err(|source| {
                    AppError::Attachments {
                        setting: "CONFAB_ATTACHMENTS_DIR",
                        source,
                    }
                })?)
            }
            AttachmentsBackend::S3(s3) => {
                let objects = S3Attachments::new(&s3).map_err(|source| AppError::Attachments {
                    setting: "CONFAB_S3_BUCKET",
                    source,
                })?;
                reach("the S3 bucket", "CONFAB_S3_BUCKET", wait, || objects.ping()).await?;
                Arc::new(objects)
            }
        };
        let attachments = Attachments::new(
            service.clone(),
            objects,
            AttachmentSettings {
                max_bytes: config.max_attachment_bytes,
                allowed_types: config.attachment_types()?,
                ..AttachmentSettings::default()
            },
        );

        let mut allowed_origins = config.origins()?;
        if allowed_origins.is_empty() {
            let port = local.port();
            allowed_origins = vec![
                format!("http://localhost:{port}"),
                format!("http://127.0.0.1:{port}"),
            ];
            if !local.ip().is_unspecified() && !local.ip().is_loopback() {
                allowed_origins.push(format!("http://{local}"));
            }
        }
        let drain = Drain::new(Duration::from_secs(config.drain_seconds));
        tokio::spawn(crate::drain::run(drain.clone(), service.clone()));
        {
            // `confab_draining` follows the drain.
            let (drain, service) = (drain.clone(), service.clone());
            tokio::spawn(async move {
                drain.reached(DrainState::Draining).await;
                service.metrics().set_draining(true);
            });
        }
        if let Some(path) = &config.drain_annotation_file {
            tokio::spawn(crate::drain::watch_annotation_file(
                path.clone(),
                drain.clone(),
            ));
        }
        let gateway = Arc::new(Gateway {
            service,
            attachments,
            auth: Arc::new(auth),
            drain,
            expiries: crate::transport::expiry::Expiries::new(Duration::from_secs(
                config.token_warning_seconds,
            )),
            settings: TransportSettings {
                allowed_origins: allowed_origins.clone(),
                trusted_proxies: config.trusted_proxies.clone(),
                max_frame_bytes: config.max_frame_bytes as usize,
                send_queue: config.send_queue as usize,
                token_warning: Duration::from_secs(config.token_warning_seconds),
                ping_interval: Duration::from_millis(config.ping_interval_ms),
                ping_timeout: Duration::from_millis(config.ping_timeout_ms),
                auth_timeout: Duration::from_millis(config.ws_auth_timeout_ms),
                send_deadline: Duration::from_millis(config.ws_send_deadline_ms),
                ws_compression: config.ws_compression,
            },
        });
        let policy = Arc::new(OriginPolicy {
            allowed: allowed_origins,
        });
        let mut router = http::routes()
            .merge(web::routes(dev_secret_path.is_some()))
            .with_state(gateway.clone())
            .merge(ws::routes(gateway.clone(), config.ws_echo_route))
            .merge(telemetry::routes(metrics))
            .layer(DefaultBodyLimit::max(config.max_frame_bytes as usize));
        let engine = engineio::Engine::new(
            engineio::settings_of(&gateway),
            Arc::new(engineio::socket::ChatSockets {
                gw: gateway.clone(),
            }),
            ws::options(&gateway.settings),
            gateway.service.metrics().clone(),
            gateway.settings.trusted_proxies.clone(),
        );
        if config.ws_echo_route {
            router = router.merge(engineio::echo_route(engine.clone()));
        }
        router = router.merge(engineio::routes("/socket.io/", engine.clone()));
        let router = router
            .layer(axum::middleware::from_fn_with_state(
                gateway.clone(),
                http::refuse_while_draining,
            ))
            .layer(axum::middleware::from_fn_with_state(policy, origin::check));
        Ok(Self {
            router,
            engine,
            gateway,
            dev_secret_path,
            server,
        })
    }
}

/// Serves until the drain has handed every connection over (or `stop` resolves: a second
/// signal), then stops accepting and waits at most a few seconds for requests in flight.
/// `drain_on` starts the drain (SIGTERM); `POST /admin/drain` and the annotation can also.
pub async fn serve(
    listener: TcpListener,
    app: App,
    drain_on: impl Future<Output = ()> + Send + 'static,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let engine = app.engine.clone();
    let gateway = app.gateway.clone();
    let drain = gateway.drain.clone();
    let (signalled_tx, mut signalled) = tokio::sync::watch::channel(false);
    {
        let drain = drain.clone();
        tokio::spawn(async move {
            drain_on.await;
            signalled_tx.send_replace(true);
            if !drain.begin("signal") && drain.state() == DrainState::Drained {
                tracing::info!("already drained: exiting");
            }
        });
    }
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let caps = Caps::new(&app.server, gateway.service.metrics().clone());
    let server = server::serve(listener, app.router, app.server, caps, async move {
        // A drain asked over HTTP or by the annotation leaves the process up, not ready and
        // empty, until its signal: exiting would only have the container restarted.
        tokio::select! {
            _ = async {
                drain.reached(DrainState::Drained).await;
                let _ = signalled.wait_for(|s| *s).await;
            } => tracing::info!("drained: shutting down"),
            _ = stop => tracing::warn!("second signal: shutting down without finishing the drain"),
        }
        engine.close_all();
        for out in gateway.service.hub().all() {
            out.close(crate::chat::hub::CloseReason::Shutdown);
        }
        let _ = stopped_tx.send(());
    });
    let metrics = app.gateway.service.metrics().clone();
    let result = tokio::select! {
        result = server => result,
        _ = async {
            let _ = stopped_rx.await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        } => {
            tracing::warn!("requests still in flight 5 s after the drain; exiting anyway");
            Ok(())
        }
    };
    // The last OTLP push; the exporter's client blocks, so off the runtime's threads.
    let _ = tokio::task::spawn_blocking(move || metrics.shutdown()).await;
    result
}
