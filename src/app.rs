//! Wiring, in one place: settings → store → controller + HTTP server.
//!
//! `Application::build` binds first (port 0 works) so tests and callers learn the address
//! before serving; `run_until_stopped` serves until the shutdown future resolves.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Settings;
use crate::controller::Controller;
use crate::dataplane::watch::WatchFeed;
use crate::dataplane::DataPlane;
use crate::domain::volume::VolumePolicy;
use crate::http::{self, AppState};
use crate::store::Store;

pub struct Application {
    listener: TcpListener,
    state: AppState,
    /// Turned true to stop the controller, the server and the watch feed.
    stop: (watch::Sender<bool>, watch::Receiver<bool>),
    /// Held while serving: see `lock_database`.
    db_lock: std::fs::File,
}

/// Takes an exclusive lock on `<database>.lock` (released when the process exits, however it
/// exits). A server answers reads from its in-memory copy of the table, so two servers on one
/// database would each miss the other's writes.
fn lock_database(db: &Path) -> anyhow::Result<std::fs::File> {
    if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("database.path: cannot create {}", dir.display()))?;
    }
    let mut path = db.as_os_str().to_owned();
    path.push(".lock");
    let path = PathBuf::from(path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(anyhow::anyhow!(
            "another sandboxd is serving {} (it holds {})",
            db.display(),
            path.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Creates a configured directory if needed and returns its canonical absolute path (Docker
/// needs absolute bind sources; relative paths are taken from the working directory).
fn ensure_dir(key: &str, path: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(path)
        .with_context(|| format!("{key}: cannot create {}", path.display()))?;
    std::fs::canonicalize(path).with_context(|| format!("{key}: cannot resolve {}", path.display()))
}

/// Makes the host directories absolute and builds the volume policy: no client volume may
/// contain sandboxd's database or config directory or the Docker socket's directory, nor overlap
/// the sandbox directories; the fixed mounts may not contain the former either.
fn prepare_host(
    settings: &mut Settings,
    config_path: Option<&Path>,
) -> anyhow::Result<VolumePolicy> {
    let s = &mut settings.sandbox;
    s.chats_root = ensure_dir("sandbox.chats_root", &s.chats_root)?;
    s.dependencies_host_path =
        ensure_dir("sandbox.dependencies_host_path", &s.dependencies_host_path)?;
    s.lambda_tools_host_path =
        ensure_dir("sandbox.lambda_tools_host_path", &s.lambda_tools_host_path)?;
    // Members' slots are bind sources: absolute, like the other sandbox directories.
    if settings.warm_pool.min_idle > 0 {
        settings.warm_pool.root = ensure_dir("warm_pool.root", &settings.warm_pool.root)?;
    }
    // Workspace file systems are mounted under it; chat directories are bind sources.
    settings.storage.root = ensure_dir("storage.root", &settings.storage.root)?;

    let db_dir = settings
        .database
        .path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut sensitive = vec![ensure_dir("database.path", db_dir)?];
    if let Some(dir) = config_path
        .and_then(Path::parent)
        .filter(|d| !d.as_os_str().is_empty())
    {
        sensitive.push(std::fs::canonicalize(dir).context("config directory")?);
    }
    if let Some(socket) = settings.docker.base_url.strip_prefix("unix://") {
        let dir = Path::new(socket).parent().unwrap_or(Path::new("/"));
        sensitive.push(std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()));
    }
    let s = &settings.sandbox;
    for (key, dir) in [
        ("sandbox.chats_root", &s.chats_root),
        ("sandbox.dependencies_host_path", &s.dependencies_host_path),
        ("sandbox.lambda_tools_host_path", &s.lambda_tools_host_path),
    ] {
        if let Some(p) = sensitive.iter().find(|p| p.starts_with(dir)) {
            anyhow::bail!(
                "{key}: {} overlaps {}, which sandboxd never mounts into a sandbox",
                dir.display(),
                p.display()
            );
        }
    }
    let protected = vec![
        s.chats_root.clone(),
        s.dependencies_host_path.clone(),
        s.lambda_tools_host_path.clone(),
        // Other chats' bound directories show through members' slots.
        settings.warm_pool.root.clone(),
    ];

    let allowed_roots = match &s.allowed_volume_roots {
        Some(roots) => Some(
            roots
                .iter()
                .map(|r| ensure_dir("sandbox.allowed_volume_roots", r))
                .collect::<anyhow::Result<Vec<_>>>()?,
        ),
        None => {
            tracing::warn!(
                "sandbox.allowed_volume_roots is not set: clients may mount any host directory \
                 that is not a protected location; set it to restrict request volumes"
            );
            None
        }
    };
    let policy = VolumePolicy {
        allowed_roots,
        sensitive,
        protected,
    };
    for r in policy.allowed_roots.iter().flatten() {
        policy
            .check_canonical(r)
            .map_err(|e| anyhow::anyhow!("sandbox.allowed_volume_roots: {}: {e}", r.display()))?;
    }
    Ok(policy)
}

/// Egress rules are per network: profiles with different egress on one network get the
/// strictest combination. Say so at start (it is allowed: a profile may differ only in its
/// runtime, or the operator may want it).
fn warn_if_profiles_share_a_network(settings: &Settings) {
    let s = &settings.sandbox;
    let mut seen: std::collections::BTreeMap<&str, (&str, crate::egress::EgressPolicy)> =
        Default::default();
    for (name, p) in &s.profiles {
        let network = p.network.as_deref().unwrap_or(&s.network_name);
        let policy = crate::egress::EgressPolicy {
            egress: p.egress,
            allow_cidrs: p.allow_cidrs.clone(),
            deny_cidrs: p.deny_cidrs.clone(),
        }
        .canonical();
        match seen.get(network) {
            Some((other, theirs)) if theirs != &policy => tracing::warn!(
                network,
                profiles = %format!("{other}, {name}"),
                "profiles with different egress share a network: its sandboxes get the strictest \
                 combination; give each its own `network`"
            ),
            _ => {
                seen.insert(network, (name, policy));
            }
        }
    }
}

/// `security.token_required: false` is a migration aid; say so loudly every start.
fn warn_if_token_not_required(settings: &Settings) {
    let sec = &settings.security;
    if sec.api_token.is_some() && !sec.token_required {
        let exposed = !crate::config::is_loopback_host(&settings.http.host);
        tracing::warn!(
            host = %settings.http.host,
            header = %sec.token_header,
            "SECURITY: security.token_required is false: requests WITHOUT the API token are \
             accepted{}; a wrong token is still refused. Set it back to true once every \
             client sends the token",
            if exposed { " on a NON-LOOPBACK address, so anyone who can reach it controls sandboxes" } else { "" }
        );
    }
}

/// How far the idle clock may lag behind a call: 1 s where an idle policy pauses or
/// hibernates on it, a minute where it is only shown (`last_active_at`, the `IDLE` column):
/// then a thousand busy chats cost a write every few milliseconds, not one per chat per
/// second (docs/performance.md, the scale bench).
fn activity_granularity(settings: &Settings) -> chrono::Duration {
    if settings.sandbox.hibernation().idle.acts() {
        chrono::Duration::seconds(1)
    } else {
        chrono::Duration::seconds(60)
    }
}

pub async fn open_store(settings: &Settings) -> anyhow::Result<Store> {
    let db = &settings.database;
    let store = Store::open(
        &db.path,
        Duration::from_millis(db.busy_timeout_ms),
        db.max_connections,
    )
    .await
    .with_context(|| format!("opening database {}", db.path.display()))?;
    store.migrate().await.context("applying migrations")?;
    Ok(store)
}

impl Application {
    /// `config_path` is the file the settings came from (its directory is protected).
    pub async fn build(mut settings: Settings, config_path: Option<&Path>) -> anyhow::Result<Self> {
        let volumes = Arc::new(prepare_host(&mut settings, config_path)?);
        warn_if_token_not_required(&settings);
        warn_if_profiles_share_a_network(&settings);
        let db_lock = lock_database(&settings.database.path)?;
        let store = open_store(&settings)
            .await?
            .serve_reads_from_memory()
            .await
            .context("loading the sandboxes table")?
            .with_activity_granularity(activity_granularity(&settings));
        let addr = format!("{}:{}", settings.http.host, settings.http.port);
        let listener = TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let stop = watch::channel(false);
        let feed = WatchFeed::start(
            store.clone(),
            settings.data_plane.watch_buffer_events,
            stop.1.clone(),
        )
        .await
        .context("starting the watch feed")?;
        let ctx = Arc::new(crate::context::Context::new(
            store,
            Arc::new(settings),
            volumes,
        ));
        // Before anything can start a sandbox on a workspace's chat directory.
        crate::storage::reconcile::at_start(&ctx.store, &ctx.storage)
            .await
            .context("reconciling chat storage")?;
        let state = AppState {
            data_plane: DataPlane::new(ctx.clone()).context("the data plane's engine link")?,
            watch: feed,
            ctx,
        };
        Ok(Self {
            listener,
            state,
            stop,
            db_lock,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn store(&self) -> Store {
        self.state.store.clone()
    }

    /// Serves HTTP and runs the controller until `shutdown` resolves; then stops accepting,
    /// lets in-flight requests and actions finish (bounded) and returns. Sandboxes keep running.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let _db_lock = self.db_lock;
        let (stop_tx, stop_rx) = self.stop;
        let controller = Controller {
            ctx: self.state.ctx.clone(),
            connector: Arc::new(crate::backend::FromSettings {
                settings: self.state.settings.clone(),
                metrics: self.state.metrics.clone(),
            }),
        };
        let controller = tokio::spawn(controller.run(stop_rx.clone()));
        let mut http_stop = stop_rx;
        let app = http::router(self.state);
        tracing::info!(addr = %self.listener.local_addr()?, "sandboxd listening");
        // The peer address is recorded in the audit log of data-plane calls.
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        let server = axum::serve(self.listener, app).with_graceful_shutdown(async move {
            let _ = http_stop.wait_for(|v| *v).await;
        });
        let server = tokio::spawn(async move { server.await });
        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(15), controller).await;
        match tokio::time::timeout(Duration::from_secs(15), server).await {
            Ok(Ok(r)) => r.context("http server")?,
            Ok(Err(e)) => return Err(e).context("http server task"),
            Err(_) => tracing::warn!("http server did not stop within 15s"),
        }
        Ok(())
    }
}

/// Resolves after SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Where to read the config: `--config`, else `SANDBOXD_CONFIG`, else embedded defaults.
pub fn config_path(flag: Option<PathBuf>) -> Option<PathBuf> {
    flag.or_else(|| std::env::var_os("SANDBOXD_CONFIG").map(PathBuf::from))
}

pub fn load_settings(path: Option<&Path>) -> anyhow::Result<Settings> {
    Ok(Settings::load(path, std::env::vars())?)
}
