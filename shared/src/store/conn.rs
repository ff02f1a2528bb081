//! One Redis connection handle for a single server, a Sentinel group or a Cluster.
//!
//! The store never holds a pool: a multiplexed connection pipelines concurrent requests on
//! one socket, which is what keeps lookups close to raw Redis throughput. The one exception
//! is a second handle for claims that `WAIT` for replicas (see `Store`), since Redis answers
//! nothing else on a connection while its WAIT blocks. The handle is
//! created lazily and re-created after a connection-level failure, so a controller starts
//! and stays alive while Redis is away (invariant 5), and follows a Sentinel failover by
//! asking the sentinels for the new primary.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, Cmd, IntoConnectionInfo, Pipeline, RedisError, RedisFuture,
    Value,
};

use crate::config::{RedisConfig, RedisTarget, TlsFiles};
use crate::store::StoreError;

/// Minimum gap between two connection attempts, so an outage does not turn every request
/// into a connect storm.
const RECONNECT_GAP: Duration = Duration::from_millis(200);
/// Least age of a connection dropped because its server refuses writes for now.
const REFUSAL_RECONNECT_GAP: Duration = Duration::from_secs(1);

/// What asking one sentinel may take beyond `redis.connect_timeout`: redis-rs asks the
/// sentinels in their listed order with its own deadlines (1 s to connect, 0.5 s for an
/// answer), so a first sentinel whose host went dark holds the lookup that long before the
/// next one's answer counts.
const SENTINEL_LOOKUP: Duration = Duration::from_secs(2);

/// A live connection of any deployment kind.
#[derive(Clone)]
pub(crate) enum Conn {
    /// Single server or Sentinel primary.
    Plain(MultiplexedConnection),
    /// Redis Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Plain(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Plain(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Plain(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

enum Source {
    Single(Client),
    Sentinel(tokio::sync::Mutex<SentinelClient>),
    Cluster(redis::cluster::ClusterClient),
}

struct Current {
    conn: Conn,
    generation: u64,
    opened: Instant,
}

struct ConnectState {
    last_failure: Option<(Instant, String)>,
}

/// Shared, cheaply clonable access to Redis.
#[derive(Clone)]
pub(crate) struct Connector {
    inner: Arc<Inner>,
}

struct Inner {
    /// Rebuilt when the TLS files change (see [`Connector::source`]).
    source: RwLock<Arc<Source>>,
    current: RwLock<Option<Current>>,
    generation: AtomicU64,
    /// Held while a connection is being opened; the opening runs in a task of its own that
    /// holds it, so a caller that gives up (a SIP request past `routing.deadline`) does not
    /// cancel a connect that needs longer than any one request waits.
    connecting: Arc<tokio::sync::Mutex<ConnectState>>,
    connect_timeout: Duration,
    /// Deadline for opening a connection through all its steps: `redis.connect_timeout` for
    /// a single server; more behind Sentinel or on a Cluster, whose connect asks other
    /// servers first, one of which may be the host that just went dark.
    connect_budget: Duration,
    response_timeout: Duration,
    is_cluster: bool,
    /// Whether a Cluster client sends a request again by itself (see [`Retries`]).
    retries: Retries,
    cluster_seeds: Vec<redis::ConnectionInfo>,
    /// `redis.tls_*` files, for clients opened later (a Cluster's pub/sub primaries).
    certs: RwLock<Option<redis::TlsCertificates>>,
    /// With `redis.tls_*` files set: the settings and the files' contents the source was
    /// built with, so renewed files (cert-manager rotates them in place) reach the next
    /// connection without a restart.
    tls_reload: Option<(RedisConfig, std::sync::Mutex<TlsFiles>)>,
}

/// `redis.tls_*` files, read; `None` when none is set.
fn tls_files(cfg: &RedisConfig) -> Result<Option<TlsFiles>, StoreError> {
    cfg.tls_files()
        .map_err(|(key, message)| StoreError::Config(format!("{key}: {message}")))
}

/// The files as redis-rs takes them.
fn certificates(f: &TlsFiles) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: f
            .client
            .clone()
            .map(|(client_cert, client_key)| redis::ClientTlsConfig {
                client_cert,
                client_key,
            }),
        root_cert: f.ca.clone(),
    }
}

/// A client for `info`, trusting the configured CAs (and presenting the client certificate)
/// when there are any.
fn open(
    info: redis::ConnectionInfo,
    certs: Option<&redis::TlsCertificates>,
) -> Result<Client, RedisError> {
    match certs {
        Some(c) if matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) => {
            Client::build_with_tls(info, c.clone())
        }
        _ => Client::open(info),
    }
}

fn config_error(what: &str, e: RedisError) -> StoreError {
    StoreError::Config(format!("{what}: {e}"))
}

/// A Sentinel client through redis-rs's builder, the one way it takes certificates: the
/// sentinels' addresses and credentials, then the data nodes'.
fn sentinel_with_certs(
    cfg: &RedisConfig,
    sentinels: Vec<redis::ConnectionInfo>,
    master_name: &str,
    certs: redis::TlsCertificates,
) -> Result<SentinelClient, RedisError> {
    let sentinel_tls = sentinels
        .iter()
        .any(|i| matches!(i.addr(), redis::ConnectionAddr::TcpTls { .. }));
    let addrs: Vec<redis::ConnectionAddr> = sentinels.iter().map(|i| i.addr().clone()).collect();
    let mut b = redis::sentinel::SentinelClientBuilder::new(
        addrs,
        master_name,
        SentinelServerType::Master,
    )?;
    // The builder takes one set of sentinel credentials: the first address's, which
    // `build` already merged with `redis.sentinel.username`/`password` (those win), as the
    // plain path passes each address's own.
    if let Some(first) = sentinels.first().map(|i| i.redis_settings()) {
        if let Some(user) = first.username() {
            b = b.set_client_to_sentinel_username(user);
        }
        if let Some(pw) = first.password() {
            b = b.set_client_to_sentinel_password(pw);
        }
    }
    if sentinel_tls {
        b = b
            .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure)
            .set_client_to_sentinel_certificates(certs.clone());
    }
    if let Some(user) = &cfg.username {
        b = b.set_client_to_redis_username(user);
    }
    if let Some(pw) = &cfg.password {
        b = b.set_client_to_redis_password(pw.expose());
    }
    if cfg.tls {
        b = b
            .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
            .set_client_to_redis_certificates(certs);
    }
    b.build()
}

/// [`Inner::connect_budget`] for `cfg`.
fn connect_budget(cfg: &RedisConfig) -> Duration {
    match cfg.target() {
        RedisTarget::Single(_) => cfg.connect_timeout,
        // The sentinels' answer, then the primary they name: connect and handshake.
        RedisTarget::Sentinel { .. } => SENTINEL_LOOKUP + cfg.connect_timeout + cfg.timeout,
        // Every seed at once (the slowest, a dark one, counts), their slot map, then the
        // primaries it names.
        RedisTarget::Cluster(_) => cfg.connect_timeout * 2 + cfg.timeout,
    }
}

/// What finding the server for a pub/sub connection may take: the sentinels' answer (asked
/// in their listed order, a dark first one holding the lookup), or on a Cluster each seed in
/// turn (connect, then its slot map), so that a dark first sentinel or seed does not keep the
/// bus from ever subscribing when `redis.timeout` is short.
pub(crate) fn lookup_budget(cfg: &RedisConfig) -> Duration {
    let most = match cfg.target() {
        RedisTarget::Single(_) => Duration::ZERO,
        RedisTarget::Sentinel { .. } => SENTINEL_LOOKUP + cfg.connect_timeout + cfg.timeout,
        RedisTarget::Cluster(seeds) => (cfg.connect_timeout + cfg.timeout)
            .saturating_mul(u32::try_from(seeds.len()).unwrap_or(u32::MAX)),
    };
    most.max(cfg.timeout * 4)
}

/// Whether a Redis Cluster client sends a request again by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Retries {
    /// It follows MOVED and ASK (a slot migration), and sends again after its connection
    /// failed: for requests that may run twice (reads, and scripts that check before they
    /// write).
    Client,
    /// Never: for a call-control command's PUBLISH, which Redis may have run when only its
    /// answer was lost, and which a node would carry out twice (PUBLISH gets no MOVED).
    None,
}

impl Connector {
    /// Prepares a connector; no connection is opened until the first request.
    pub(crate) fn new(cfg: &RedisConfig, retries: Retries) -> Result<Self, StoreError> {
        let is_cluster = matches!(cfg.target(), RedisTarget::Cluster(_));
        let files = tls_files(cfg)?;
        let certs = files.as_ref().map(certificates);
        let (source, cluster_seeds) = build(cfg, certs.as_ref(), retries)?;
        Ok(Connector {
            inner: Arc::new(Inner {
                source: RwLock::new(Arc::new(source)),
                current: RwLock::new(None),
                generation: AtomicU64::new(0),
                connecting: Arc::new(tokio::sync::Mutex::new(ConnectState { last_failure: None })),
                connect_timeout: cfg.connect_timeout,
                connect_budget: connect_budget(cfg),
                response_timeout: cfg.timeout,
                is_cluster,
                retries,
                cluster_seeds,
                certs: RwLock::new(certs),
                tls_reload: files.map(|f| (cfg.clone(), std::sync::Mutex::new(f))),
            }),
        })
    }

    /// The clients' source; with TLS files set, rebuilt first when their contents changed
    /// since it was built (checked when a connection is opened, not per command). Files
    /// that cannot be read or built from leave the last good source in place.
    fn source(&self) -> Arc<Source> {
        if let Some((cfg, built_from)) = &self.inner.tls_reload {
            match tls_files(cfg) {
                Ok(Some(now)) => {
                    let changed = built_from.lock().map(|f| *f != now).unwrap_or(false);
                    if changed {
                        let certs = certificates(&now);
                        match build(cfg, Some(&certs), self.inner.retries) {
                            Ok((source, _)) => {
                                tracing::info!("Redis TLS files changed; new connections use them");
                                if let Ok(mut s) = self.inner.source.write() {
                                    *s = Arc::new(source);
                                }
                                if let Ok(mut c) = self.inner.certs.write() {
                                    *c = Some(certs);
                                }
                                if let Ok(mut f) = built_from.lock() {
                                    *f = now;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "Redis TLS files changed but cannot be used; keeping the previous ones")
                            }
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the Redis TLS files again; keeping the previous ones")
                }
            }
        }
        match self.inner.source.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn certs(&self) -> Option<redis::TlsCertificates> {
        match self.inner.certs.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// `info` with the data nodes' user and password (`redis.username`, `redis.password`).
fn with_credentials(info: redis::ConnectionInfo, cfg: &RedisConfig) -> redis::ConnectionInfo {
    let mut settings = info.redis_settings().clone();
    if let Some(user) = &cfg.username {
        settings = settings.set_username(user);
    }
    if let Some(pw) = &cfg.password {
        settings = settings.set_password(pw.expose());
    }
    info.set_redis_settings(settings)
}

/// The clients for `cfg`'s deployment, with `certs` for TLS; and a Cluster's seeds.
fn build(
    cfg: &RedisConfig,
    certs: Option<&redis::TlsCertificates>,
    retries: Retries,
) -> Result<(Source, Vec<redis::ConnectionInfo>), StoreError> {
    let mut cluster_seeds = Vec::new();
    let source = match cfg.target() {
        RedisTarget::Single(url) => {
            let mut info = url
                .as_str()
                .into_connection_info()
                .map_err(|e| config_error("redis.url", e))?;
            info = with_credentials(info, cfg);
            Source::Single(open(info, certs).map_err(|e| config_error("redis.url", e))?)
        }
        RedisTarget::Sentinel {
            master_name,
            addresses,
        } => {
            let sentinel_cfg = cfg.sentinel.as_ref();
            let mut infos = Vec::with_capacity(addresses.len());
            for (i, a) in addresses.iter().enumerate() {
                let key = format!("redis.sentinel.addresses[{i}]");
                let mut info = a
                    .as_str()
                    .into_connection_info()
                    .map_err(|e| config_error(&key, e))?;
                let mut settings = info.redis_settings().clone();
                if let Some(s) = sentinel_cfg {
                    if let Some(user) = &s.username {
                        settings = settings.set_username(user);
                    }
                    if let Some(pw) = &s.password {
                        settings = settings.set_password(pw.expose());
                    }
                }
                info = info.set_redis_settings(settings);
                infos.push(info);
            }
            let mut node_settings = redis::RedisConnectionInfo::default();
            if let Some(user) = &cfg.username {
                node_settings = node_settings.set_username(user);
            }
            if let Some(pw) = &cfg.password {
                node_settings = node_settings.set_password(pw.expose());
            }
            let mut node_info =
                SentinelNodeConnectionInfo::default().set_redis_connection_info(node_settings);
            if cfg.tls {
                node_info = node_info.set_tls_mode(redis::TlsMode::Secure);
            }
            let creds = |i: &redis::ConnectionInfo| {
                let r = i.redis_settings();
                (
                    r.username().map(str::to_owned),
                    r.password().map(str::to_owned),
                )
            };
            if certs.is_some() && infos.windows(2).any(|w| creds(&w[0]) != creds(&w[1])) {
                return Err(StoreError::Config(
                    "redis.sentinel.addresses: with redis.tls_ca_file or a client certificate \
                     every sentinel takes the same user and password; set them once in \
                     redis.sentinel.username and redis.sentinel.password"
                        .into(),
                ));
            }
            let client = match certs {
                None => SentinelClient::build(
                    infos,
                    master_name,
                    Some(node_info),
                    SentinelServerType::Master,
                ),
                Some(c) => sentinel_with_certs(cfg, infos, &master_name, c.clone()),
            }
            .map_err(|e| config_error("redis.sentinel", e))?;
            Source::Sentinel(tokio::sync::Mutex::new(client))
        }
        RedisTarget::Cluster(seeds) => {
            for (i, seed) in seeds.iter().enumerate() {
                let mut info = seed
                    .as_str()
                    .into_connection_info()
                    .map_err(|e| config_error(&format!("redis.cluster.seeds[{i}]"), e))?;
                info = with_credentials(info, cfg);
                cluster_seeds.push(info);
            }
            let mut builder = redis::cluster::ClusterClientBuilder::new(seeds)
                .connection_timeout(cfg.connect_timeout)
                .response_timeout(cfg.timeout);
            if retries == Retries::None {
                builder = builder.retries(0);
            }
            if let Some(user) = &cfg.username {
                builder = builder.username(user);
            }
            if let Some(pw) = &cfg.password {
                builder = builder.password(pw.expose());
            }
            if cfg.tls {
                builder = builder.tls(redis::TlsMode::Secure);
            }
            if let Some(c) = &certs {
                builder = builder.certs((*c).clone());
            }
            Source::Cluster(
                builder
                    .build()
                    .map_err(|e| config_error("redis.cluster.seeds", e))?,
            )
        }
    };
    Ok((source, cluster_seeds))
}

impl Connector {
    /// True for a Redis Cluster deployment.
    pub(crate) fn is_cluster(&self) -> bool {
        self.inner.is_cluster
    }

    /// How many connections were opened so far: it changes when Redis was reconnected to.
    pub(crate) fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Relaxed)
    }

    /// The current connection, opening one if there is none.
    pub(crate) async fn get(&self) -> Result<(Conn, u64), StoreError> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let state = self.inner.connecting.clone().lock_owned().await;
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        if let Some((at, why)) = &state.last_failure {
            if at.elapsed() < RECONNECT_GAP {
                return Err(StoreError::Unavailable(format!(
                    "reconnecting after: {why}"
                )));
            }
        }
        let me = self.clone();
        match tokio::spawn(async move { me.open(state).await }).await {
            Ok(result) => result,
            Err(e) => Err(StoreError::Unavailable(format!("connect failed: {e}"))),
        }
    }

    /// Opens a connection within the connect budget and records the outcome; `state` is
    /// held until then.
    async fn open(
        &self,
        mut state: tokio::sync::OwnedMutexGuard<ConnectState>,
    ) -> Result<(Conn, u64), StoreError> {
        match tokio::time::timeout(self.inner.connect_budget, self.connect()).await {
            Ok(Ok(conn)) => {
                let generation = self.inner.generation.fetch_add(1, Ordering::Relaxed) + 1;
                if let Ok(mut slot) = self.inner.current.write() {
                    *slot = Some(Current {
                        conn: conn.clone(),
                        generation,
                        opened: Instant::now(),
                    });
                }
                state.last_failure = None;
                Ok((conn, generation))
            }
            Ok(Err(e)) => {
                let why = format!("connect failed: {e}");
                state.last_failure = Some((Instant::now(), why.clone()));
                Err(StoreError::Unavailable(why))
            }
            Err(_) => {
                let why = format!("connect timed out after {:?}", self.inner.connect_budget);
                state.last_failure = Some((Instant::now(), why.clone()));
                Err(StoreError::Unavailable(why))
            }
        }
    }

    fn cached(&self) -> Option<(Conn, u64)> {
        let slot = self.inner.current.read().ok()?;
        slot.as_ref().map(|c| (c.conn.clone(), c.generation))
    }

    async fn connect(&self) -> Result<Conn, RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.inner.connect_timeout))
            .set_response_timeout(Some(self.inner.response_timeout));
        match &*self.source() {
            Source::Single(client) => Ok(Conn::Plain(
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?,
            )),
            Source::Sentinel(client) => {
                let mut client = client.lock().await;
                Ok(Conn::Plain(
                    client.get_async_connection_with_config(&config).await?,
                ))
            }
            Source::Cluster(client) => Ok(Conn::Cluster(client.get_async_connection().await?)),
        }
    }

    /// A client for a pub/sub connection: the single server, the current Sentinel primary,
    /// or on a Cluster the primary serving `slot` (the channels' slot). Cluster pub/sub
    /// delivers a message to every node's subscribers, but `PUBLISH` (routed by its
    /// channel's slot) counts only those of the node that took it, and the bus reads a count
    /// of 0 as "nobody listening".
    pub(crate) async fn pubsub_client(&self, slot: u16) -> Result<Client, RedisError> {
        match &*self.source() {
            Source::Single(client) => Ok(client.clone()),
            Source::Sentinel(client) => client.lock().await.async_get_client().await,
            Source::Cluster(_) => {
                let mut last = None;
                for seed in &self.inner.cluster_seeds {
                    match self.slot_primary_via(seed, slot).await {
                        Ok(info) => return open(info, self.certs().as_ref()),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    RedisError::from((redis::ErrorKind::InvalidClientConfig, "no cluster seeds"))
                }))
            }
        }
    }

    /// On a Cluster, `host:port` of the primary serving `slot` now (`None` elsewhere), so a
    /// subscriber can tell that a failover moved it.
    pub(crate) async fn slot_primary(&self, slot: u16) -> Result<Option<String>, RedisError> {
        if !self.inner.is_cluster {
            return Ok(None);
        }
        // Asked over the store's own Cluster connection, this check (every few seconds per
        // subscriber) opens no connection; a seed is asked only when that fails, or when the
        // answer gives no host (the one it was reached at is not known here).
        if let Ok((Conn::Cluster(mut c), _)) = self.get().await {
            let slots = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<redis::Value>(&mut c)
                .await;
            if let Some((host, port)) = slots
                .ok()
                .and_then(|s| primary_of(&s, slot))
                .filter(|(host, _)| !host.is_empty() && host != "?")
            {
                return Ok(Some(format!("{host}:{port}")));
            }
        }
        let mut last = None;
        for seed in &self.inner.cluster_seeds {
            match self.slot_primary_via(seed, slot).await {
                Ok(info) => return Ok(Some(address(&info))),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            RedisError::from((redis::ErrorKind::InvalidClientConfig, "no cluster seeds"))
        }))
    }

    /// Asks `seed` which primary serves `slot`; that primary's connection details (the
    /// seed's credentials and TLS settings, its address).
    async fn slot_primary_via(
        &self,
        seed: &redis::ConnectionInfo,
        slot: u16,
    ) -> Result<redis::ConnectionInfo, RedisError> {
        let client = open(seed.clone(), self.certs().as_ref())?;
        let mut conn = tokio::time::timeout(
            self.inner.connect_timeout,
            client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| {
            RedisError::from((redis::ErrorKind::Io, "cluster seed connect timed out"))
        })??;
        let slots: redis::Value = tokio::time::timeout(
            self.inner.response_timeout,
            redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut conn),
        )
        .await
        .map_err(|_| RedisError::from((redis::ErrorKind::Io, "cluster seed answer timed out")))??;
        let (host, port) = primary_of(&slots, slot).ok_or_else(|| {
            RedisError::from((redis::ErrorKind::Client, "no primary serves the bus's slot"))
        })?;
        let addr = match seed.addr().clone() {
            // An empty address means "the one you reached me at".
            redis::ConnectionAddr::Tcp(seed_host, _) => {
                redis::ConnectionAddr::Tcp(if host.is_empty() { seed_host } else { host }, port)
            }
            redis::ConnectionAddr::TcpTls {
                host: seed_host,
                insecure,
                tls_params,
                ..
            } => redis::ConnectionAddr::TcpTls {
                host: if host.is_empty() { seed_host } else { host },
                port,
                insecure,
                tls_params,
            },
            other => other,
        };
        Ok(seed.clone().set_addr(addr))
    }

    /// Drops connection `generation` after a failure that means it is no longer usable.
    /// Drops the current connection whatever its generation: the next request opens one.
    pub(crate) fn reset(&self) {
        if let Ok(mut slot) = self.inner.current.write() {
            *slot = None;
        }
    }

    pub(crate) fn invalidate(&self, generation: u64) {
        if let Ok(mut slot) = self.inner.current.write() {
            if slot.as_ref().is_some_and(|c| c.generation == generation) {
                *slot = None;
            }
        }
    }

    /// [`Connector::invalidate`] for a server that refuses writes for now (see
    /// [`is_refusal`]): only a connection open [`REFUSAL_RECONNECT_GAP`] or longer is dropped.
    /// A reconnect finds a new primary if there is one; while the same server goes on
    /// refusing (memory full for minutes), every refused write would otherwise open a
    /// connection of its own, and reads, which it still serves, would queue behind them.
    pub(crate) fn invalidate_refused(&self, generation: u64) {
        if let Ok(mut slot) = self.inner.current.write() {
            if slot.as_ref().is_some_and(|c| {
                c.generation == generation && c.opened.elapsed() >= REFUSAL_RECONNECT_GAP
            }) {
                *slot = None;
            }
        }
    }
}

/// `host:port` of a connection's address (the socket path for a Unix socket).
pub(crate) fn address(info: &redis::ConnectionInfo) -> String {
    match info.addr() {
        redis::ConnectionAddr::Tcp(h, p)
        | redis::ConnectionAddr::TcpTls {
            host: h, port: p, ..
        } => {
            format!("{h}:{p}")
        }
        redis::ConnectionAddr::Unix(path) => path.display().to_string(),
        other => format!("{other:?}"),
    }
}

/// The primary serving `slot` in a `CLUSTER SLOTS` reply: `(ip, port)`, the ip empty when
/// the node does not know its own.
fn primary_of(reply: &redis::Value, slot: u16) -> Option<(String, u16)> {
    use redis::Value;
    let Value::Array(ranges) = reply else {
        return None;
    };
    let int = |v: &Value| match v {
        Value::Int(n) => Some(*n),
        _ => None,
    };
    ranges.iter().find_map(|range| {
        let Value::Array(r) = range else { return None };
        let (start, end) = (int(r.first()?)?, int(r.get(1)?)?);
        if !(start..=end).contains(&i64::from(slot)) {
            return None;
        }
        let Value::Array(primary) = r.get(2)? else {
            return None;
        };
        let host = match primary.first()? {
            Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            Value::SimpleString(s) => s.clone(),
            _ => return None,
        };
        let port = u16::try_from(int(primary.get(1)?)?).ok()?;
        Some((host, port))
    })
}

/// True when an error means the connection (or the server role behind it) cannot be reused.
pub(crate) fn is_fatal(e: &RedisError) -> bool {
    if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
    {
        return true;
    }
    // A former primary demoted by Sentinel answers READONLY; MASTERDOWN means the server
    // behind this socket cannot serve now.
    matches!(e.code(), Some("READONLY") | Some("MASTERDOWN")) || is_refusal(e)
}

/// True for a server that refuses writes for now, and may go on refusing for minutes. LOADING
/// and CLUSTERDOWN pass. A primary cut off from its replicas refuses writes with NOREPLICAS
/// (min-replicas-to-write) and may never learn it was replaced: connecting again asks
/// Sentinel for the primary anew. OOM and MISCONF refuse every write too, heartbeats
/// included, so leases run out as in an outage.
pub(crate) fn is_refusal(e: &RedisError) -> bool {
    matches!(
        e.code(),
        Some("LOADING") | Some("CLUSTERDOWN") | Some("NOREPLICAS") | Some("OOM") | Some("MISCONF")
    )
}

/// The Cluster hash slot of a key (CRC16/XMODEM of its hash tag, mod 16384).
pub(crate) fn hash_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            key[open + 1..]
                .iter()
                .position(|&b| b == b'}')
                .filter(|&len| len > 0)
                .map(|len| &key[open + 1..open + 1 + len])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &b in tagged {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// Connections for claims that WAIT for replicas, each lent to one claim at a time: Redis
/// holds a client's later commands until its WAIT returns, so two claims sharing a
/// connection would wait one behind the other, and behind a lagging replica every claim
/// after the first would run out of time. Connections open as concurrency asks for them.
pub(crate) struct ConnectorPool {
    connectors: Vec<Connector>,
    free: std::sync::Mutex<Vec<usize>>,
    permits: tokio::sync::Semaphore,
}

/// One connection of a [`ConnectorPool`], given back when dropped.
pub(crate) struct Lent<'a> {
    pool: &'a ConnectorPool,
    index: usize,
    done: bool,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl Lent<'_> {
    /// The lent connection.
    pub(crate) fn connector(&self) -> &Connector {
        &self.pool.connectors[self.index]
    }

    /// The claim ran to its end: nothing of it is left waiting on the connection.
    pub(crate) fn finished(&mut self) {
        self.done = true;
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        // A claim dropped halfway (its caller's deadline) may leave a WAIT Redis still holds
        // the connection for: the next claim lent it would queue behind that WAIT. It opens
        // a new connection instead.
        if !self.done {
            self.connector().reset();
        }
        self.pool
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(self.index);
    }
}

impl ConnectorPool {
    /// `size` lazily connecting connectors for `cfg`.
    pub(crate) fn new(cfg: &RedisConfig, size: usize) -> Result<Self, StoreError> {
        let size = size.max(1);
        let connectors = (0..size)
            .map(|_| Connector::new(cfg, Retries::Client))
            .collect::<Result<Vec<_>, _>>()?;
        // Taken from the end: the connection used last (already open) is lent first.
        let free = (0..size).rev().collect();
        Ok(ConnectorPool {
            connectors,
            free: std::sync::Mutex::new(free),
            permits: tokio::sync::Semaphore::new(size),
        })
    }

    /// Lends a connection no other claim uses, waiting at most `within` for one.
    pub(crate) async fn lend(&self, within: Duration) -> Option<Lent<'_>> {
        let permit = tokio::time::timeout(within, self.permits.acquire())
            .await
            .ok()?
            .ok()?;
        let index = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop()?;
        Some(Lent {
            pool: self,
            index,
            done: false,
            _permit: permit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{hash_slot, primary_of};

    #[test]
    fn the_primary_of_a_slot_is_read_from_cluster_slots() {
        use redis::Value;
        let node = |ip: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(ip.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("10.0.0.1", 7000),
                node("10.0.0.4", 7003),
            ]),
            Value::Array(vec![Value::Int(5461), Value::Int(16383), node("", 7001)]),
        ]);
        assert_eq!(primary_of(&reply, 3375), Some(("10.0.0.1".into(), 7000)));
        assert_eq!(primary_of(&reply, 5461), Some((String::new(), 7001)));
        assert_eq!(primary_of(&Value::Array(vec![]), 1), None);
        assert_eq!(primary_of(&Value::Nil, 1), None);
    }

    #[test]
    fn hash_slots_match_redis() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(hash_slot(b"123456789"), 0x31C3);
        assert_eq!(hash_slot(b"foo"), 12182);
        assert_eq!(hash_slot(b"{user1000}.following"), hash_slot(b"user1000"));
        assert_eq!(hash_slot(b"{}x"), hash_slot(b"{}x"));
        assert_eq!(
            hash_slot(b"{confroute}:conf:a"),
            hash_slot(b"{confroute}:nodes")
        );
    }
}
