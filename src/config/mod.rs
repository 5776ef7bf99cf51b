//! Typed settings: the old service's YAML layout (`http, logging, metrics, otel, docker, sandbox,
//! security`) plus sandboxd's own sections (`database`, `controller`).
//!
//! Sources, later wins: embedded defaults → YAML file → `APP_*` environment overrides.
//! Unknown keys and bad values fail at start with the dotted key in the message.

mod env;
pub mod spec;
mod validate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use env::ENV_OVERRIDES;
pub use validate::{is_loopback_host, MAX_CONFIG_TTL_SECONDS};

/// Everything wrong with a configuration, each message naming its key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid config: {key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub http: HttpSettings,
    pub logging: LoggingSettings,
    pub metrics: MetricsSettings,
    pub otel: OtelSettings,
    pub docker: DockerSettings,
    pub sandbox: SandboxSettings,
    pub security: SecuritySettings,
    pub database: DatabaseSettings,
    pub controller: ControllerSettings,
    pub data_plane: DataPlaneSettings,
    /// The backend: one Docker engine, or Docker Swarm services through a manager's engine.
    pub runtime: RuntimeKind,
    pub swarm: SwarmSettings,
    pub podman: PodmanSettings,
    pub warm_pool: WarmPoolSettings,
    pub storage: StorageSettings,
}

/// Chat storage (`storage/`, docs/storage.md): each workspace's chats live on a file system of
/// its own, an ext4 image under `root` sized to the workspace's quota and loop-mounted, so the
/// kernel holds the quota inside sandboxes too.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    /// Holds `images/<workspace>.img` and their mount points `mnt/<workspace>/`.
    pub root: PathBuf,
    /// The quota of a workspace made without one.
    pub default_quota_bytes: u64,
    /// The largest quota a workspace may ask for.
    pub max_quota_bytes: u64,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            root: "var/sandbox/storage".into(),
            default_quota_bytes: 1 << 30,
            max_quota_bytes: 1 << 40,
        }
    }
}

/// Warm starts (`pool/`): containers of the default profile started ahead of need; a create
/// for a new chat claims one (its mounts and env bound at claim) instead of starting cold.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarmPoolSettings {
    /// Idle members kept started. 0: no pool, every create starts cold.
    pub min_idle: usize,
    /// Most members not yet claimed (idle and starting).
    pub max: usize,
    /// Each member's host directory (`<root>/<slot>`), onto which a claim bind-mounts the
    /// chat directory and the request volume.
    pub root: PathBuf,
}

impl Default for WarmPoolSettings {
    fn default() -> Self {
        Self {
            min_idle: 0,
            max: 20,
            root: "var/sandbox/pool".into(),
        }
    }
}

/// Which backend runs sandboxes (`docs/scale-out.md`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    /// Containers on the engine at `docker.base_url`.
    #[default]
    Docker,
    /// One-replica Swarm services, through the manager engine at `docker.base_url`.
    Swarm,
    /// Containers through the Podman service's Docker-compatible API at `docker.base_url`
    /// (`podman system service`; docs/podman.md).
    Podman,
}

impl RuntimeKind {
    /// The name in config, logs and readiness.
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Docker => "docker",
            RuntimeKind::Swarm => "swarm",
            RuntimeKind::Podman => "podman",
        }
    }
}

/// `runtime: podman`: resource limits Podman needs set on every container. Podman's own
/// defaults exceed what the host allows here (a start then fails with "error setting
/// rlimit"); dockerd's containers inherit the engine's. Each is capped at sandboxd's own hard
/// limit when the backend connects.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PodmanSettings {
    /// Open files per sandbox process (`RLIMIT_NOFILE`, soft = hard).
    pub ulimit_nofile: u64,
    /// Processes per user (`RLIMIT_NPROC`, soft = hard). Counted per uid across the host, not
    /// per sandbox (`sandbox.hardening.pids_limit` is the per-sandbox cap); root is exempt.
    pub ulimit_nproc: u64,
}

impl Default for PodmanSettings {
    fn default() -> Self {
        Self {
            ulimit_nofile: 65536,
            ulimit_nproc: 32768,
        }
    }
}

/// Swarm mode (`runtime: swarm`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SwarmSettings {
    /// How long a start waits for the service's task to run before it counts as failed (a
    /// task no node can take stays pending for ever).
    pub start_timeout_seconds: u64,
    /// The stop grace of a task (drain, node loss, removal): the agent gets SIGTERM, then
    /// SIGKILL after this long. Tasks run with an init, so SIGTERM is delivered.
    pub stop_grace_seconds: u64,
    /// Each node's own engine, by node hostname: the data plane's exec and files go there,
    /// and what the node enforces is read from its `docker info`. A node left out still runs
    /// sandboxes; its data plane answers 501.
    pub nodes: BTreeMap<String, NodeEngine>,
}

impl Default for SwarmSettings {
    fn default() -> Self {
        Self {
            start_timeout_seconds: 60,
            stop_grace_seconds: 1,
            nodes: BTreeMap::new(),
        }
    }
}

/// One node's engine: `unix://`, `tcp://`/`http://`, or `https://` with client certificates.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeEngine {
    pub base_url: String,
    /// With `https://`: the CA, client certificate and key (PEM files), all three.
    #[serde(default)]
    pub tls: Option<NodeTls>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    pub host: String,
    pub port: u16,
    /// Largest accepted request body; larger ones get 413 before any parsing.
    pub body_limit_bytes: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8123,
            body_limit_bytes: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingSettings {
    /// `TRACE`, `DEBUG`, `INFO`, `WARNING`/`WARN`, `ERROR` (any case) or a tracing filter.
    pub level: String,
    /// `stdout` or `stderr`. (`otel` from old configs is accepted and logs to stdout.)
    pub output: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LoggingSettings {
    fn default() -> Self {
        Self {
            level: "INFO".into(),
            output: "stdout".into(),
            format: "text".into(),
        }
    }
}

/// Whether `GET /metrics` serves Prometheus metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    pub enabled: bool,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// OpenTelemetry. With `enabled`, spans are exported over OTLP/HTTP (protobuf) to
/// `traces_endpoint` (default `http://127.0.0.1:4318/v1/traces`). The logs and metrics
/// endpoints of old configs are accepted and unused (metrics: `/metrics`).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct OtelSettings {
    pub enabled: bool,
    pub service_name: Option<String>,
    pub logs_endpoint: Option<String>,
    pub metrics_endpoint: Option<String>,
    pub traces_endpoint: Option<String>,
    pub metric_export_interval: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PullPolicy {
    /// Never contact a registry; a missing image is a start failure with a clear message.
    Never,
    /// Pull only when the image is not present locally.
    IfNotPresent,
    /// Build the image from `docker.build_context` (a directory with a Dockerfile) when it
    /// is not present locally; never contact a registry for the sandbox image itself.
    Build,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerSettings {
    /// `unix:///path/to/docker.sock`, `tcp://host:port` or `http://host:port`.
    pub base_url: String,
    pub pull_policy: PullPolicy,
    /// Per-request timeout for Docker API calls.
    pub timeout_seconds: u64,
    /// With `pull_policy: build`: the directory holding the Dockerfile (and what it copies).
    pub build_context: Option<PathBuf>,
}

impl Default for DockerSettings {
    fn default() -> Self {
        Self {
            base_url: "unix:///var/run/docker.sock".into(),
            pull_policy: PullPolicy::IfNotPresent,
            timeout_seconds: 60,
            build_context: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxSettings {
    pub image: String,
    pub network_name: String,
    /// How many of this instance's containers one sandbox network holds. A Linux bridge has
    /// 1,024 ports, so a network refuses its 1,024th container; past this count new ones go
    /// on a further network of the same settings (`<network>-1`, `<network>-2`, …), or, with
    /// `network_sharding` off, fail naming the limit. A network's own subnet may bound it
    /// lower (Podman's default /24 holds 253): the smaller one counts (`docs/scale-out.md`).
    pub network_capacity: u32,
    /// Off: every sandbox of a profile on its one network, and a start past
    /// `network_capacity` fails with an error naming it.
    pub network_sharding: bool,
    pub agent_service_port: u16,
    pub ttl_seconds: u64,
    /// Resync period of the controller (the old service's cleanup loop period).
    pub cleanup_interval_seconds: u64,
    pub chats_root: PathBuf,
    pub dependencies_host_path: PathBuf,
    pub lambda_tools_host_path: PathBuf,
    pub chat_mount_path: String,
    pub dependencies_mount_path: String,
    pub lambda_tools_mount_path: String,
    pub volume_mount_path: String,
    /// Extra environment for every sandbox; `AGENT_ID` is always set from the request.
    pub env: BTreeMap<String, String>,
    /// Request volumes must lie under one of these. Absent (old configs): any directory that
    /// is not a protected location is accepted, and a warning is logged at start.
    pub allowed_volume_roots: Option<Vec<PathBuf>>,
    pub hardening: HardeningSettings,
    /// Publish the agent port on `publish_host_ip` at an ephemeral host port (shown in the
    /// declarative view as `host_port`). Off by default: the sandbox network is enough for
    /// clients on the same host.
    pub publish_agent_port: bool,
    pub publish_host_ip: String,
    /// The profile of a session whose request names none.
    pub default_profile: String,
    /// Isolation profiles by name: runtime, hardening, egress (`docs/security.md`).
    pub profiles: BTreeMap<String, ProfileSettings>,
    /// Pause a sandbox idle this long (no create/reuse, exec, file call, renew); 0 = off.
    pub idle_pause_seconds: u64,
    /// Hibernate (stop, keeping the container) a sandbox idle this long; 0 = off.
    pub idle_hibernate_seconds: u64,
    /// What a session's TTL ends in: `delete` (the old behaviour) or `hibernate`.
    pub on_expiry: crate::domain::hibernation::OnExpiry,
    /// A sandbox declared hibernated (by a client or at expiry) is deleted this long after.
    pub hibernated_retention_seconds: u64,
    /// A hibernating container gets SIGTERM, then SIGKILL after this many seconds.
    pub hibernate_stop_seconds: u64,
}

impl SandboxSettings {
    /// The hibernation policy the planner's caller applies.
    pub fn hibernation(&self) -> crate::domain::hibernation::Policy {
        let after = |s: u64| (s > 0).then(|| seconds(s));
        crate::domain::hibernation::Policy {
            idle: crate::domain::hibernation::IdlePolicy {
                pause_after: after(self.idle_pause_seconds),
                hibernate_after: after(self.idle_hibernate_seconds),
            },
            on_expiry: self.on_expiry,
        }
    }

    /// How long a sandbox declared hibernated is kept.
    pub fn hibernated_retention(&self) -> chrono::Duration {
        seconds(self.hibernated_retention_seconds)
    }

    /// The TTL of a session whose request names none (and what a resume gives at least).
    pub fn ttl(&self) -> chrono::Duration {
        seconds(self.ttl_seconds)
    }
}

/// A duration setting; validation bounds every one to `MAX_CONFIG_TTL_SECONDS`, far inside
/// chrono's range.
fn seconds(s: u64) -> chrono::Duration {
    chrono::Duration::seconds(i64::try_from(s.min(MAX_CONFIG_TTL_SECONDS)).unwrap_or(i64::MAX))
}

/// An isolation profile: which runtime runs the sandbox, how it is hardened, and where it may
/// connect. Part of a session's frozen spec.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ProfileSettings {
    /// A runtime registered with the engine: `runc` (the default) or `runsc` (gVisor).
    pub runtime: String,
    /// Replaces `sandbox.hardening` for this profile (limits included); absent keeps it.
    pub hardening: Option<HardeningSettings>,
    /// `allow`: everything but `deny_cidrs`; `deny`: nothing but `allow_cidrs`.
    pub egress: crate::egress::EgressMode,
    /// IPv4 CIDRs, or `host` for every address of the host. Default: private, shared and
    /// link-local ranges and the host.
    pub deny_cidrs: Vec<String>,
    /// Reachable even when denied otherwise (checked first).
    pub allow_cidrs: Vec<String>,
    /// The network this profile's sandboxes join (created if missing); default
    /// `sandbox.network_name`. Egress rules apply per network, so profiles whose egress
    /// differs belong on different networks (on a shared one the strictest combination wins).
    pub network: Option<String>,
}

impl Default for ProfileSettings {
    fn default() -> Self {
        Self {
            runtime: "runc".into(),
            hardening: None,
            egress: crate::egress::EgressMode::Allow,
            deny_cidrs: crate::egress::DEFAULT_DENY
                .iter()
                .map(|s| s.to_string())
                .collect(),
            allow_cidrs: Vec::new(),
            network: None,
        }
    }
}

/// The name of the built-in profile.
pub const STANDARD_PROFILE: &str = "standard";

/// Container hardening. The defaults are strict; loosen them here when an agent needs it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HardeningSettings {
    /// Every capability is dropped; these are added back (e.g. `NET_BIND_SERVICE`).
    pub cap_add: Vec<String>,
    pub no_new_privileges: bool,
    /// Most processes a sandbox may run (fork bombs stop here).
    pub pids_limit: i64,
    pub memory_mb: u64,
    /// CPU quota in thousandths of a core (1000 = one core).
    pub cpu_millis: u64,
    /// Read-only root file system; `/tmp` then becomes a tmpfs of `tmpfs_tmp_mb`.
    pub read_only_rootfs: bool,
    pub tmpfs_tmp_mb: u64,
    /// `uid[:gid]` or a user name of the image; `None` keeps the image's user.
    pub user: Option<String>,
}

impl Default for HardeningSettings {
    fn default() -> Self {
        Self {
            cap_add: Vec::new(),
            no_new_privileges: true,
            pids_limit: 512,
            memory_mb: 1024,
            cpu_millis: 1000,
            read_only_rootfs: false,
            tmpfs_tmp_mb: 64,
            user: None,
        }
    }
}

impl Default for SandboxSettings {
    fn default() -> Self {
        Self {
            image: "sandboxd/agent-busybox:latest".into(),
            network_name: "sandbox".into(),
            network_capacity: 1000,
            network_sharding: true,
            agent_service_port: 8000,
            ttl_seconds: 300,
            cleanup_interval_seconds: 60,
            chats_root: "var/sandbox/chats".into(),
            dependencies_host_path: "var/sandbox/dependencies".into(),
            lambda_tools_host_path: "var/sandbox/lambda-tools".into(),
            chat_mount_path: "/workspace/chat".into(),
            dependencies_mount_path: "/opt/dependencies".into(),
            lambda_tools_mount_path: "/opt/lambda-tools".into(),
            volume_mount_path: "/workspace/volume".into(),
            env: BTreeMap::new(),
            allowed_volume_roots: None,
            hardening: HardeningSettings::default(),
            publish_agent_port: false,
            publish_host_ip: "127.0.0.1".into(),
            default_profile: STANDARD_PROFILE.into(),
            profiles: BTreeMap::from([(STANDARD_PROFILE.into(), ProfileSettings::default())]),
            idle_pause_seconds: 0,
            idle_hibernate_seconds: 0,
            on_expiry: crate::domain::hibernation::OnExpiry::Delete,
            hibernated_retention_seconds: 7 * 24 * 3600,
            hibernate_stop_seconds: 10,
        }
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecuritySettings {
    pub token_header: String,
    /// When set, every route but health requires it; when unset, only loopback is served.
    pub api_token: Option<String>,
    /// With `false`, requests that carry no token are let through (a wrong token is still
    /// refused): old deployments set `APP_API_TOKEN` but their clients never sent it, so they
    /// can switch first and enforce later. Logged loudly at start.
    pub token_required: bool,
    /// Accepted for compatibility with old configs; unused.
    pub signing_key: Option<String>,
}

impl Default for SecuritySettings {
    fn default() -> Self {
        Self {
            token_header: "X-API-Token".into(),
            api_token: None,
            token_required: true,
            signing_key: None,
        }
    }
}

impl std::fmt::Debug for SecuritySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mask = |s: &Option<String>| s.as_ref().map(|_| "***");
        f.debug_struct("SecuritySettings")
            .field("token_header", &self.token_header)
            .field("api_token", &mask(&self.api_token))
            .field("token_required", &self.token_required)
            .field("signing_key", &mask(&self.signing_key))
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    pub path: PathBuf,
    pub busy_timeout_ms: u64,
    pub max_connections: u32,
    /// Events older than this are deleted (checked hourly).
    pub event_retention_days: u64,
    /// Rows of expired sessions untouched for this long are deleted (the events stay).
    pub expired_retention_days: u64,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            path: "var/sandboxd.db".into(),
            busy_timeout_ms: 5_000,
            max_connections: 8,
            event_retention_days: 30,
            expired_retention_days: 7,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerSettings {
    /// Name of this sandboxd instance; it only ever touches containers labelled with it.
    pub instance: String,
    /// Sandboxes started at once. The engine's throughput peaks at 2–4 concurrent starts.
    pub max_concurrent_actions: usize,
    /// How long `POST /api/v1/create` waits for the controller before answering 504.
    pub create_wait_seconds: u64,
    /// How long `DELETE /api/v1/sandboxes/{chat_id}` waits for the container to be gone.
    pub delete_wait_seconds: u64,
    /// Upper bound for the optional `wait` parameter of the declarative API.
    pub max_wait_seconds: u64,
    /// First retry delay after a failed action; doubles per failure, with jitter.
    pub backoff_initial_ms: u64,
    /// Cap of the per-sandbox retry delay.
    pub backoff_max_seconds: u64,
    /// At every connect, adopt the running containers the old Python service started and
    /// remove its stopped ones. They belong to no instance: on an engine shared by several
    /// instances, leave this on for exactly one of them.
    pub take_over_old_service: bool,
}

impl Default for ControllerSettings {
    fn default() -> Self {
        Self {
            instance: "default".into(),
            max_concurrent_actions: 4,
            create_wait_seconds: 60,
            delete_wait_seconds: 60,
            max_wait_seconds: 300,
            backoff_initial_ms: 500,
            backoff_max_seconds: 60,
            take_over_old_service: true,
        }
    }
}

/// The data plane: exec, files and watch on running sandboxes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataPlaneSettings {
    /// Timeout of an exec that names none.
    pub exec_default_timeout_seconds: u64,
    /// Largest `timeout_seconds` an exec may ask for.
    pub exec_max_timeout_seconds: u64,
    /// Output kept per stream (stdout, stderr) of a buffered exec; the rest is read and
    /// dropped, and the answer says `truncated`. A streamed exec stops sending there too.
    pub exec_output_limit_bytes: usize,
    /// Longest command (all argv bytes, or the shell string).
    pub exec_max_command_bytes: usize,
    /// Data-plane calls (exec, file read/write/list) in flight at once, over all sandboxes;
    /// over it the answer is 429 with `Retry-After`.
    pub max_concurrent: usize,
    /// The same, per sandbox.
    pub max_concurrent_per_sandbox: usize,
    /// Largest file a write may carry (413 above).
    pub file_write_limit_bytes: usize,
    /// Largest file a read may return (413 above).
    pub file_read_limit_bytes: u64,
    /// Most entries a directory listing returns (the answer says `truncated`).
    pub list_max_entries: usize,
    /// Events a watch client may fall behind before it is cut off with a `resync` event
    /// (the change stream and the file watch).
    pub watch_buffer_events: usize,
    /// Background processes running at once, over all sandboxes (429 above).
    pub max_processes: usize,
    /// The same, per sandbox.
    pub max_processes_per_sandbox: usize,
    /// Output kept in memory per background process (stdout and stderr together); older
    /// output is dropped and a reader that asks for it is told how many bytes it missed.
    pub process_output_bytes: usize,
    /// Ended processes kept per sandbox (their record, and their output while sandboxd runs).
    pub processes_kept_ended: usize,
    /// Terminals open at once, over all sandboxes, and per sandbox (429 above).
    pub max_terminals: usize,
    pub max_terminals_per_sandbox: usize,
    /// How long a terminal whose WebSocket dropped waits to be re-attached before it is
    /// closed (its process tree killed).
    pub terminal_grace_seconds: u64,
    /// Output a terminal keeps for a re-attach to replay (the last screenful or so).
    pub terminal_replay_bytes: usize,
    /// File watches open at once, over all sandboxes, and per sandbox (429 above). Each is
    /// an inotify instance on the host, whose limit (`fs.inotify.max_user_instances`) is
    /// often 128 for every program of the user together.
    pub max_file_watches: usize,
    pub max_file_watches_per_sandbox: usize,
}

impl Default for DataPlaneSettings {
    fn default() -> Self {
        Self {
            exec_default_timeout_seconds: 60,
            exec_max_timeout_seconds: 3600,
            exec_output_limit_bytes: 1024 * 1024,
            exec_max_command_bytes: 32 * 1024,
            max_concurrent: 64,
            max_concurrent_per_sandbox: 8,
            file_write_limit_bytes: 16 * 1024 * 1024,
            file_read_limit_bytes: 64 * 1024 * 1024,
            list_max_entries: 10_000,
            watch_buffer_events: 1024,
            max_processes: 64,
            max_processes_per_sandbox: 8,
            process_output_bytes: 1024 * 1024,
            processes_kept_ended: 32,
            max_terminals: 32,
            max_terminals_per_sandbox: 4,
            terminal_grace_seconds: 60,
            terminal_replay_bytes: 16 * 1024,
            max_file_watches: 32,
            max_file_watches_per_sandbox: 4,
        }
    }
}

impl Settings {
    /// Embedded defaults, then the YAML file (if any), then `APP_*` overrides from `vars`.
    pub fn load(
        path: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?,
                p.display().to_string(),
            ),
            None => (String::new(), "<embedded defaults>".to_string()),
        };
        Self::from_yaml_str(&text, &origin, vars)
    }

    /// Parses YAML text (empty means "all defaults") and applies `APP_*` overrides.
    pub fn from_yaml_str(
        text: &str,
        origin: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut doc: serde_norway::Value = if text.trim().is_empty() {
            serde_norway::Value::Mapping(Default::default())
        } else {
            serde_norway::from_str(text).map_err(|e| ConfigError::Parse {
                path: origin.to_string(),
                message: e.to_string(),
            })?
        };
        if doc.is_null() {
            doc = serde_norway::Value::Mapping(Default::default());
        }
        env::apply_overrides(&mut doc, vars)?;
        let settings: Settings = serde_path_to_error::deserialize(doc).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Invalid {
                key: if key == "." { "<root>".into() } else { key },
                message: e.into_inner().to_string(),
            }
        })?;
        settings.validate()?;
        Ok(settings)
    }

    /// The effective settings as YAML, secrets included: for handing a config file to a
    /// child process (tests, benches). Never print it.
    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// The effective settings as YAML with secrets masked (for `check-config`).
    pub fn to_masked_yaml(&self) -> String {
        let mut copy = self.clone();
        let mask = |s: &mut Option<String>| {
            if s.is_some() {
                *s = Some("***".into());
            }
        };
        mask(&mut copy.security.api_token);
        mask(&mut copy.security.signing_key);
        serde_norway::to_string(&copy).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

#[cfg(test)]
mod tests;
