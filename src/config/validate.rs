//! Semantic checks that serde's types cannot express. Each error names its key.

use std::net::IpAddr;

use super::{invalid, ConfigError, Settings};

/// The longest session a config may ask for: 365 days.
pub const MAX_CONFIG_TTL_SECONDS: u64 = 365 * 24 * 3600;

/// A Linux bridge has 1,024 ports: its 1,024th container is refused.
const MAX_NETWORK_CAPACITY: u64 = 1023;

impl Settings {
    fn validate_profiles(&self) -> Result<(), ConfigError> {
        let s = &self.sandbox;
        if !s.profiles.contains_key(&s.default_profile) {
            let names: Vec<&str> = s.profiles.keys().map(String::as_str).collect();
            return Err(invalid(
                "sandbox.default_profile",
                format!(
                    "`{}` is not a profile (sandbox.profiles has: {})",
                    s.default_profile,
                    names.join(", ")
                ),
            ));
        }
        for (name, p) in &s.profiles {
            let key = |k: &str| format!("sandbox.profiles.{name}.{k}");
            let name_ok = !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !name_ok {
                return Err(invalid(
                    &format!("sandbox.profiles.{name}"),
                    "profile names are 1-64 characters of A-Z, a-z, 0-9, `-`, `_`",
                ));
            }
            let runtime_ok = !p.runtime.is_empty()
                && p.runtime
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !runtime_ok {
                return Err(invalid(
                    &key("runtime"),
                    "a runtime name registered with the engine, e.g. runc or runsc",
                ));
            }
            if let Some(net) = &p.network {
                let bad = net.is_empty()
                    || matches!(net.as_str(), "host" | "none")
                    || net.starts_with("container:");
                if bad {
                    return Err(invalid(
                        &key("network"),
                        "must be a Docker network sandboxes can join with their own address (not `host`, `none` or `container:…`)",
                    ));
                }
            }
            for (field, list) in [
                ("deny_cidrs", &p.deny_cidrs),
                ("allow_cidrs", &p.allow_cidrs),
            ] {
                for entry in list {
                    crate::egress::check_cidr(entry).map_err(|m| invalid(&key(field), m))?;
                }
            }
        }
        Ok(())
    }

    /// Swarm mode's own keys, and what it cannot do with the shared ones.
    fn validate_swarm(&self) -> Result<(), ConfigError> {
        let w = &self.swarm;
        within(
            "swarm.start_timeout_seconds",
            w.start_timeout_seconds,
            1,
            3600,
        )?;
        within("swarm.stop_grace_seconds", w.stop_grace_seconds, 0, 300)?;
        for (node, engine) in &w.nodes {
            let key = format!("swarm.nodes.{node}.base_url");
            let url = engine.base_url.as_str();
            let scheme_ok = ["unix://", "tcp://", "http://", "https://"]
                .iter()
                .any(|p| url.starts_with(p));
            if !scheme_ok {
                return Err(invalid(
                    &key,
                    "must start with unix://, tcp://, http:// or https://",
                ));
            }
            match (url.starts_with("https://"), &engine.tls) {
                (true, None) => {
                    return Err(invalid(
                        &format!("swarm.nodes.{node}.tls"),
                        "an https:// engine needs tls: {ca, cert, key}",
                    ))
                }
                (false, Some(_)) => {
                    return Err(invalid(
                        &key,
                        "tls is set: the engine must be an https:// address",
                    ))
                }
                _ => {}
            }
        }
        if self.runtime == super::RuntimeKind::Podman
            && !["unix://", "tcp://", "http://"]
                .iter()
                .any(|p| self.docker.base_url.starts_with(p))
        {
            return Err(invalid(
                "docker.base_url",
                "with runtime: podman, the Podman service is reached at a unix://, tcp:// or \
                 http:// address (`podman system service unix:///run/podman/podman.sock`)",
            ));
        }
        if self.runtime != super::RuntimeKind::Swarm {
            return Ok(());
        }
        let s = &self.sandbox;
        for (key, on) in [
            ("sandbox.idle_pause_seconds", s.idle_pause_seconds > 0),
            (
                "sandbox.idle_hibernate_seconds",
                s.idle_hibernate_seconds > 0,
            ),
            (
                "sandbox.on_expiry",
                s.on_expiry == crate::domain::hibernation::OnExpiry::Hibernate,
            ),
        ] {
            if on {
                return Err(invalid(
                    key,
                    "is not available with runtime: swarm (a service cannot be paused or \
                     stopped in place; docs/hibernation.md)",
                ));
            }
        }
        if self.sandbox.publish_agent_port {
            return Err(invalid(
                "sandbox.publish_agent_port",
                "is not available with runtime: swarm (sandboxes are reached at their overlay \
                 address; ingress publishing needs IPVS)",
            ));
        }
        if self.docker.pull_policy == super::PullPolicy::Build {
            return Err(invalid(
                "docker.pull_policy",
                "build is not available with runtime: swarm (each node needs the image; load \
                 it on every node)",
            ));
        }
        if !["unix://", "tcp://", "http://"]
            .iter()
            .any(|p| self.docker.base_url.starts_with(p))
        {
            return Err(invalid(
                "docker.base_url",
                "with runtime: swarm, the manager's engine is reached at a unix://, tcp:// or \
                 http:// address (run sandboxd on a manager, as deploy/ does)",
            ));
        }
        Ok(())
    }

    fn validate_data_plane(&self) -> Result<(), ConfigError> {
        let d = &self.data_plane;
        within(
            "data_plane.exec_max_timeout_seconds",
            d.exec_max_timeout_seconds,
            1,
            24 * 3600,
        )?;
        within(
            "data_plane.exec_default_timeout_seconds",
            d.exec_default_timeout_seconds,
            1,
            d.exec_max_timeout_seconds,
        )?;
        for (key, v) in [
            (
                "data_plane.exec_output_limit_bytes",
                d.exec_output_limit_bytes,
            ),
            (
                "data_plane.exec_max_command_bytes",
                d.exec_max_command_bytes,
            ),
            ("data_plane.max_concurrent", d.max_concurrent),
            (
                "data_plane.max_concurrent_per_sandbox",
                d.max_concurrent_per_sandbox,
            ),
            (
                "data_plane.file_write_limit_bytes",
                d.file_write_limit_bytes,
            ),
            ("data_plane.list_max_entries", d.list_max_entries),
            ("data_plane.watch_buffer_events", d.watch_buffer_events),
            ("data_plane.max_processes", d.max_processes),
            (
                "data_plane.max_processes_per_sandbox",
                d.max_processes_per_sandbox,
            ),
            ("data_plane.process_output_bytes", d.process_output_bytes),
            ("data_plane.processes_kept_ended", d.processes_kept_ended),
            ("data_plane.max_terminals", d.max_terminals),
            (
                "data_plane.max_terminals_per_sandbox",
                d.max_terminals_per_sandbox,
            ),
            ("data_plane.terminal_replay_bytes", d.terminal_replay_bytes),
            ("data_plane.max_file_watches", d.max_file_watches),
            (
                "data_plane.max_file_watches_per_sandbox",
                d.max_file_watches_per_sandbox,
            ),
        ] {
            positive(key, v as u64)?;
        }
        positive("data_plane.file_read_limit_bytes", d.file_read_limit_bytes)?;
        within(
            "data_plane.terminal_grace_seconds",
            d.terminal_grace_seconds,
            0,
            24 * 3600,
        )?;
        Ok(())
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.validate_data_plane()?;
        self.validate_profiles()?;
        self.validate_swarm()?;
        let w = &self.warm_pool;
        within("warm_pool.max", w.max as u64, 0, 1000)?;
        within("warm_pool.min_idle", w.min_idle as u64, 0, w.max as u64)?;
        let st = &self.storage;
        within(
            "storage.max_quota_bytes",
            st.max_quota_bytes,
            1 << 20,
            1 << 50,
        )?;
        within(
            "storage.default_quota_bytes",
            st.default_quota_bytes,
            1 << 20,
            st.max_quota_bytes,
        )?;
        let s = &self.sandbox;
        non_empty("sandbox.image", &s.image)?;
        if s.publish_host_ip.parse::<IpAddr>().is_err() {
            return Err(invalid(
                "sandbox.publish_host_ip",
                "must be an IP address (e.g. 127.0.0.1)",
            ));
        }
        if self.docker.pull_policy == super::PullPolicy::Build {
            match &self.docker.build_context {
                Some(dir) if dir.join("Dockerfile").is_file() => {}
                Some(dir) => {
                    return Err(invalid(
                        "docker.build_context",
                        format!("{} holds no Dockerfile", dir.display()),
                    ))
                }
                None => {
                    return Err(invalid(
                        "docker.build_context",
                        "is required with docker.pull_policy: build",
                    ))
                }
            }
        }
        non_empty("sandbox.network_name", &s.network_name)?;
        if matches!(s.network_name.as_str(), "host" | "none")
            || s.network_name.starts_with("container:")
        {
            return Err(invalid(
                "sandbox.network_name",
                "must be a Docker network sandboxes can join with their own address (not `host`, `none` or `container:…`)",
            ));
        }
        within(
            "sandbox.network_capacity",
            u64::from(s.network_capacity),
            1,
            MAX_NETWORK_CAPACITY,
        )?;
        if s.agent_service_port == 0 {
            return Err(invalid("sandbox.agent_service_port", "must be 1..=65535"));
        }
        within(
            "sandbox.ttl_seconds",
            s.ttl_seconds,
            1,
            MAX_CONFIG_TTL_SECONDS,
        )?;
        positive(
            "sandbox.cleanup_interval_seconds",
            s.cleanup_interval_seconds,
        )?;
        for (key, value) in [
            ("sandbox.idle_pause_seconds", s.idle_pause_seconds),
            ("sandbox.idle_hibernate_seconds", s.idle_hibernate_seconds),
        ] {
            within(key, value, 0, MAX_CONFIG_TTL_SECONDS)?;
        }
        within(
            "sandbox.hibernated_retention_seconds",
            s.hibernated_retention_seconds,
            1,
            MAX_CONFIG_TTL_SECONDS,
        )?;
        within(
            "sandbox.hibernate_stop_seconds",
            s.hibernate_stop_seconds,
            0,
            300,
        )?;
        for (key, path) in [
            ("sandbox.chats_root", &s.chats_root),
            ("sandbox.dependencies_host_path", &s.dependencies_host_path),
            ("sandbox.lambda_tools_host_path", &s.lambda_tools_host_path),
        ] {
            if path.as_os_str().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        let targets = [
            ("sandbox.chat_mount_path", &s.chat_mount_path),
            (
                "sandbox.dependencies_mount_path",
                &s.dependencies_mount_path,
            ),
            (
                "sandbox.lambda_tools_mount_path",
                &s.lambda_tools_mount_path,
            ),
            ("sandbox.volume_mount_path", &s.volume_mount_path),
        ];
        for (i, (key, target)) in targets.iter().enumerate() {
            if !target.starts_with('/') || target.contains(':') {
                return Err(invalid(key, "must be an absolute container path"));
            }
            if targets[..i].iter().any(|(_, other)| other == target) {
                return Err(invalid(key, "must differ from the other mount paths"));
            }
        }
        for name in s.env.keys() {
            let ok = !name.is_empty()
                && !name.contains('=')
                && !name.contains('\0')
                && name != "AGENT_ID";
            if !ok {
                return Err(invalid(
                    &format!("sandbox.env.{name}"),
                    "invalid variable name (AGENT_ID is set by sandboxd)",
                ));
            }
        }

        if let Some(roots) = &s.allowed_volume_roots {
            if roots.is_empty() {
                return Err(invalid(
                    "sandbox.allowed_volume_roots",
                    "must list at least one directory (leave the key out to allow any)",
                ));
            }
            for r in roots {
                if r.as_os_str().is_empty() || r == std::path::Path::new("/") {
                    return Err(invalid(
                        "sandbox.allowed_volume_roots",
                        format!("`{}` is not allowed as a root", r.display()),
                    ));
                }
            }
        }
        check_hardening("sandbox.hardening", &s.hardening)?;

        match self.logging.format.as_str() {
            "text" | "json" => {}
            _ => return Err(invalid("logging.format", "must be `text` or `json`")),
        }
        match self.logging.output.as_str() {
            "stdout" | "stderr" | "otel" => {}
            _ => {
                return Err(invalid(
                    "logging.output",
                    "must be `stdout` or `stderr` (`otel` is read as stdout)",
                ))
            }
        }
        crate::telemetry::parse_level(&self.logging.level)
            .map_err(|m| invalid("logging.level", m))?;

        if let Some(endpoint) = &self.otel.traces_endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(invalid(
                    "otel.traces_endpoint",
                    "must be an http:// or https:// URL",
                ));
            }
        }

        let base = &self.docker.base_url;
        if !(base.starts_with("unix://")
            || base.starts_with("tcp://")
            || base.starts_with("http://"))
        {
            return Err(invalid(
                "docker.base_url",
                "must start with unix://, tcp:// or http://",
            ));
        }
        positive("docker.timeout_seconds", self.docker.timeout_seconds)?;
        if self.sandbox.hibernate_stop_seconds >= self.docker.timeout_seconds {
            return Err(invalid(
                "sandbox.hibernate_stop_seconds",
                "must be shorter than docker.timeout_seconds (the stop call waits the grace)",
            ));
        }

        let sec = &self.security;
        if axum::http::HeaderName::from_bytes(sec.token_header.as_bytes()).is_err() {
            return Err(invalid(
                "security.token_header",
                "not a valid HTTP header name",
            ));
        }
        if let Some(token) = &sec.api_token {
            if token.trim().is_empty() {
                return Err(invalid("security.api_token", "must not be blank when set"));
            }
        }
        if sec.api_token.is_none() && !is_loopback_host(&self.http.host) {
            return Err(invalid(
                "http.host",
                "without security.api_token sandboxd only listens on loopback \
                 (127.0.0.1, ::1, localhost); set a token to listen on other addresses",
            ));
        }
        if self.http.body_limit_bytes < 1024 {
            return Err(invalid("http.body_limit_bytes", "must be at least 1024"));
        }

        if self.database.path.as_os_str().is_empty() {
            return Err(invalid("database.path", "must not be empty"));
        }
        positive("database.busy_timeout_ms", self.database.busy_timeout_ms)?;
        within(
            "database.event_retention_days",
            self.database.event_retention_days,
            1,
            36_500,
        )?;
        within(
            "database.expired_retention_days",
            self.database.expired_retention_days,
            1,
            36_500,
        )?;
        if self.database.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }

        let c = &self.controller;
        let instance_ok = !c.instance.is_empty()
            && c.instance.len() <= 48
            && c.instance
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_' || ch == '.')
            && c.instance
                .chars()
                .next()
                .is_some_and(|ch| ch.is_ascii_alphanumeric());
        if !instance_ok {
            return Err(invalid(
                "controller.instance",
                "1-48 characters [A-Za-z0-9_.-], starting with a letter or digit",
            ));
        }
        if c.max_concurrent_actions == 0 {
            return Err(invalid(
                "controller.max_concurrent_actions",
                "must be at least 1",
            ));
        }
        positive("controller.create_wait_seconds", c.create_wait_seconds)?;
        positive("controller.delete_wait_seconds", c.delete_wait_seconds)?;
        positive("controller.backoff_initial_ms", c.backoff_initial_ms)?;
        positive("controller.backoff_max_seconds", c.backoff_max_seconds)?;
        Ok(())
    }
}

fn non_empty(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        Err(invalid(key, "must not be empty"))
    } else {
        Ok(())
    }
}

fn within(key: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(invalid(key, format!("must be between {min} and {max}")))
    }
}

fn positive(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        Err(invalid(key, "must be greater than 0"))
    } else {
        Ok(())
    }
}

/// `localhost` or a loopback IP literal.
pub fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// The checks of `sandbox.hardening`, also for each profile's own `hardening`.
fn check_hardening(prefix: &str, h: &super::HardeningSettings) -> Result<(), ConfigError> {
    for cap in &h.cap_add {
        let ok = !cap.is_empty()
            && cap
                .chars()
                .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit());
        if !ok || cap == "ALL" || cap == "SYS_ADMIN" {
            return Err(invalid(
                &format!("{prefix}.cap_add"),
                format!("`{cap}`: capability names like NET_BIND_SERVICE; ALL and SYS_ADMIN are refused"),
            ));
        }
    }
    if h.pids_limit < 16 {
        return Err(invalid(
            &format!("{prefix}.pids_limit"),
            "must be at least 16",
        ));
    }
    if h.memory_mb < 16 {
        return Err(invalid(
            &format!("{prefix}.memory_mb"),
            "must be at least 16",
        ));
    }
    if h.cpu_millis < 10 {
        return Err(invalid(
            &format!("{prefix}.cpu_millis"),
            "must be at least 10",
        ));
    }
    if h.read_only_rootfs && h.tmpfs_tmp_mb == 0 {
        return Err(invalid(
            &format!("{prefix}.tmpfs_tmp_mb"),
            "must be > 0 with a read-only root",
        ));
    }
    if let Some(user) = &h.user {
        if user.trim().is_empty() || user.contains(char::is_whitespace) {
            return Err(invalid(
                &format!("{prefix}.user"),
                "must be `uid[:gid]` or a user name",
            ));
        }
    }
    Ok(())
}
