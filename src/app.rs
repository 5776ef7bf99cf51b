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
use tokio::sync::{watch, Notify};

use crate::config::Settings;
use crate::controller::{Controller, ControllerStatus};
use crate::http::{self, AppState};
use crate::store::Store;

pub struct Application {
    listener: TcpListener,
    state: AppState,
}

/// Makes the configured host directories exist and turns them absolute (Docker needs
/// absolute bind sources). Relative paths are taken from the working directory.
fn absolutize_host_dirs(settings: &mut Settings) -> anyhow::Result<()> {
    let s = &mut settings.sandbox;
    for (key, path) in [
        ("sandbox.chats_root", &mut s.chats_root),
        (
            "sandbox.dependencies_host_path",
            &mut s.dependencies_host_path,
        ),
        (
            "sandbox.lambda_tools_host_path",
            &mut s.lambda_tools_host_path,
        ),
    ] {
        std::fs::create_dir_all(&*path)
            .with_context(|| format!("{key}: cannot create {}", path.display()))?;
        *path = std::fs::canonicalize(&*path)
            .with_context(|| format!("{key}: cannot resolve {}", path.display()))?;
    }
    Ok(())
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
    pub async fn build(mut settings: Settings) -> anyhow::Result<Self> {
        absolutize_host_dirs(&mut settings)?;
        let store = open_store(&settings).await?;
        let addr = format!("{}:{}", settings.http.host, settings.http.port);
        let listener = TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let state = AppState {
            store,
            settings: Arc::new(settings),
            wake: Arc::new(Notify::new()),
            controller: Arc::new(ControllerStatus::default()),
        };
        Ok(Self { listener, state })
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
        let (stop_tx, stop_rx) = watch::channel(false);
        let controller = Controller::new(
            self.state.store.clone(),
            self.state.settings.clone(),
            self.state.wake.clone(),
            self.state.controller.clone(),
        );
        let controller = tokio::spawn(controller.run(stop_rx.clone()));
        let mut http_stop = stop_rx;
        let app = http::router(self.state);
        tracing::info!(addr = %self.listener.local_addr()?, "sandboxd listening");
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
