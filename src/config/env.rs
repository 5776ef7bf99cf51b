//! `APP_*` environment overrides, with the old service's variable names.

use serde_norway::{Mapping, Value};

use super::ConfigError;

/// How an environment value is put into the YAML tree before typed parsing.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Kept as a string even when it looks like a number (tokens, names, paths).
    Text,
    /// Read as a YAML scalar, so `300` is a number and `true` a boolean.
    Scalar,
}

/// Every `APP_*` variable sandboxd reads, and the dotted key it overrides.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("APP_HTTP_HOST", "http.host"),
    ("APP_HTTP_PORT", "http.port"),
    ("APP_HTTP_BODY_LIMIT_BYTES", "http.body_limit_bytes"),
    ("APP_LOGGING_LEVEL", "logging.level"),
    ("APP_LOGGING_OUTPUT", "logging.output"),
    ("APP_LOGGING_FORMAT", "logging.format"),
    ("APP_METRICS_ENABLED", "metrics.enabled"),
    ("APP_OTEL_ENABLED", "otel.enabled"),
    ("APP_OTEL_SERVICE_NAME", "otel.service_name"),
    ("APP_OTEL_LOGS_ENDPOINT", "otel.logs_endpoint"),
    ("APP_OTEL_METRICS_ENDPOINT", "otel.metrics_endpoint"),
    ("APP_OTEL_TRACES_ENDPOINT", "otel.traces_endpoint"),
    ("APP_RUNTIME", "runtime"),
    ("APP_STORAGE_ROOT", "storage.root"),
    (
        "APP_STORAGE_DEFAULT_QUOTA_BYTES",
        "storage.default_quota_bytes",
    ),
    ("APP_STORAGE_MAX_QUOTA_BYTES", "storage.max_quota_bytes"),
    ("APP_PODMAN_ULIMIT_NOFILE", "podman.ulimit_nofile"),
    ("APP_PODMAN_ULIMIT_NPROC", "podman.ulimit_nproc"),
    ("APP_DOCKER_BASE_URL", "docker.base_url"),
    ("APP_DOCKER_PULL_POLICY", "docker.pull_policy"),
    ("APP_DOCKER_TIMEOUT_SECONDS", "docker.timeout_seconds"),
    ("APP_DOCKER_BUILD_CONTEXT", "docker.build_context"),
    ("APP_SANDBOX_IMAGE", "sandbox.image"),
    ("APP_SANDBOX_NETWORK_NAME", "sandbox.network_name"),
    ("APP_SANDBOX_NETWORK_CAPACITY", "sandbox.network_capacity"),
    ("APP_SANDBOX_NETWORK_SHARDING", "sandbox.network_sharding"),
    (
        "APP_SANDBOX_AGENT_SERVICE_PORT",
        "sandbox.agent_service_port",
    ),
    ("APP_SANDBOX_TTL_SECONDS", "sandbox.ttl_seconds"),
    (
        "APP_SANDBOX_CLEANUP_INTERVAL_SECONDS",
        "sandbox.cleanup_interval_seconds",
    ),
    ("APP_SANDBOX_CHATS_ROOT", "sandbox.chats_root"),
    (
        "APP_SANDBOX_DEPENDENCIES_HOST_PATH",
        "sandbox.dependencies_host_path",
    ),
    (
        "APP_SANDBOX_LAMBDA_TOOLS_HOST_PATH",
        "sandbox.lambda_tools_host_path",
    ),
    ("APP_SANDBOX_CHAT_MOUNT_PATH", "sandbox.chat_mount_path"),
    (
        "APP_SANDBOX_DEPENDENCIES_MOUNT_PATH",
        "sandbox.dependencies_mount_path",
    ),
    (
        "APP_SANDBOX_LAMBDA_TOOLS_MOUNT_PATH",
        "sandbox.lambda_tools_mount_path",
    ),
    ("APP_SANDBOX_VOLUME_MOUNT_PATH", "sandbox.volume_mount_path"),
    ("APP_API_TOKEN_HEADER", "security.token_header"),
    ("APP_API_TOKEN", "security.api_token"),
    ("APP_API_TOKEN_REQUIRED", "security.token_required"),
    ("APP_SIGNING_KEY", "security.signing_key"),
    ("APP_DATABASE_PATH", "database.path"),
    ("APP_DATABASE_BUSY_TIMEOUT_MS", "database.busy_timeout_ms"),
    (
        "APP_DATABASE_EVENT_RETENTION_DAYS",
        "database.event_retention_days",
    ),
    (
        "APP_DATABASE_EXPIRED_RETENTION_DAYS",
        "database.expired_retention_days",
    ),
    ("APP_CONTROLLER_INSTANCE", "controller.instance"),
    (
        "APP_CONTROLLER_MAX_CONCURRENT_ACTIONS",
        "controller.max_concurrent_actions",
    ),
    (
        "APP_CONTROLLER_CREATE_WAIT_SECONDS",
        "controller.create_wait_seconds",
    ),
    (
        "APP_CONTROLLER_DELETE_WAIT_SECONDS",
        "controller.delete_wait_seconds",
    ),
    (
        "APP_CONTROLLER_TAKE_OVER_OLD_SERVICE",
        "controller.take_over_old_service",
    ),
];

/// Keys whose values stay text whatever they look like.
const TEXT_KEYS: &[&str] = &[
    "http.host",
    "logging.level",
    "logging.output",
    "logging.format",
    "otel.service_name",
    "otel.logs_endpoint",
    "otel.metrics_endpoint",
    "otel.traces_endpoint",
    "docker.base_url",
    "docker.build_context",
    "sandbox.image",
    "sandbox.network_name",
    "sandbox.chats_root",
    "sandbox.dependencies_host_path",
    "sandbox.lambda_tools_host_path",
    "sandbox.chat_mount_path",
    "sandbox.dependencies_mount_path",
    "sandbox.lambda_tools_mount_path",
    "sandbox.volume_mount_path",
    "security.token_header",
    "security.api_token",
    "security.signing_key",
    "database.path",
    "controller.instance",
    "storage.root",
];

fn kind_of(key: &str) -> Kind {
    if TEXT_KEYS.contains(&key) {
        Kind::Text
    } else {
        Kind::Scalar
    }
}

/// Writes every known `APP_*` variable present in `vars` into the YAML tree.
pub(super) fn apply_overrides(
    doc: &mut Value,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (var, raw) in vars {
        let Some((_, key)) = ENV_OVERRIDES.iter().find(|(name, _)| *name == var) else {
            continue;
        };
        let value = match kind_of(key) {
            Kind::Text => Value::String(raw),
            Kind::Scalar => {
                let parsed: Value = serde_norway::from_str(&raw).map_err(|e| ConfigError::Env {
                    var: var.clone(),
                    message: e.to_string(),
                })?;
                if parsed.is_mapping() || parsed.is_sequence() {
                    return Err(ConfigError::Env {
                        var,
                        message: format!("expected a single value for {key}"),
                    });
                }
                parsed
            }
        };
        set_path(doc, key, value).map_err(|message| ConfigError::Env { var, message })?;
    }
    Ok(())
}

fn set_path(doc: &mut Value, dotted: &str, value: Value) -> Result<(), String> {
    let root = doc
        .as_mapping_mut()
        .ok_or_else(|| "config root is not a mapping".to_string())?;
    // A top-level key (`runtime`).
    let Some((section, field)) = dotted.split_once('.') else {
        root.insert(Value::String(dotted.into()), value);
        return Ok(());
    };
    let entry = root
        .entry(Value::String(section.into()))
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if entry.is_null() {
        *entry = Value::Mapping(Mapping::new());
    }
    let map = entry
        .as_mapping_mut()
        .ok_or_else(|| format!("config section {section} is not a mapping"))?;
    map.insert(Value::String(field.into()), value);
    Ok(())
}
