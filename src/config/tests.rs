use super::*;

fn load(yaml: &str, vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    Settings::from_yaml_str(
        yaml,
        "test.yaml",
        vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
}

#[test]
fn empty_config_is_the_embedded_defaults() {
    let s = load("", &[]).unwrap();
    assert_eq!(s.http.port, 8123);
    assert_eq!(s.sandbox.ttl_seconds, 300);
    assert_eq!(s.security.token_header, "X-API-Token");
    assert_eq!(s.docker.base_url, "unix:///var/run/docker.sock");
}

#[test]
fn reads_the_old_service_layout() {
    let yaml = r#"
http: {host: 127.0.0.1, port: 8123}
logging: {level: DEBUG, output: stdout, format: text}
metrics: {enabled: true}
otel: {metric_export_interval: 1000}
docker: {base_url: "unix:///var/run/docker.sock"}
sandbox:
  image: ai-agent:latest
  network_name: sandbox
  agent_service_port: 8000
  ttl_seconds: 3000
  cleanup_interval_seconds: 60
  chats_root: /tmp/master-sandbox/chats
  dependencies_host_path: /tmp/master-sandbox/dependencies
  lambda_tools_host_path: /tmp/master-sandbox/lambda-tools
  chat_mount_path: /workspace/chat
  dependencies_mount_path: /opt/dependencies
  lambda_tools_mount_path: /opt/lambda-tools
  volume_mount_path: /workspace/volume
  env:
    PROVIDER_API_KEY: "1234"
    PROVIDER_MODEL: gemini
security:
  token_header: X-API-Token
"#;
    let s = load(yaml, &[]).unwrap();
    assert_eq!(s.sandbox.image, "ai-agent:latest");
    assert_eq!(s.sandbox.ttl_seconds, 3000);
    assert_eq!(s.sandbox.env["PROVIDER_API_KEY"], "1234");
    assert_eq!(s.otel.metric_export_interval, Some(1000));
}

#[test]
fn env_overrides_win_and_keep_text_as_text() {
    let s = load(
        "sandbox: {ttl_seconds: 10}",
        &[
            ("APP_SANDBOX_TTL_SECONDS", "42"),
            ("APP_API_TOKEN", "1234"),
            ("APP_SANDBOX_IMAGE", "img:1"),
            ("UNRELATED", "x"),
        ],
    )
    .unwrap();
    assert_eq!(s.sandbox.ttl_seconds, 42);
    assert_eq!(s.security.api_token.as_deref(), Some("1234"));
    assert_eq!(s.sandbox.image, "img:1");
}

#[test]
fn unknown_keys_are_named() {
    let err = load("sandbox: {imagee: x}", &[]).unwrap_err().to_string();
    assert!(err.contains("sandbox") && err.contains("imagee"), "{err}");
    let err = load("nonsense: {}", &[]).unwrap_err().to_string();
    assert!(err.contains("nonsense"), "{err}");
}

#[test]
fn bad_values_are_named() {
    let err = load("sandbox: {ttl_seconds: soon}", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("sandbox.ttl_seconds"), "{err}");
    let err = load("", &[("APP_SANDBOX_TTL_SECONDS", "-1")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("sandbox.ttl_seconds"), "{err}");
    let err = load("sandbox: {ttl_seconds: 0}", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("sandbox.ttl_seconds"), "{err}");
    let err = load("controller: {instance: 'a b'}", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("controller.instance"), "{err}");
    let err = load("sandbox: {chat_mount_path: relative}", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("sandbox.chat_mount_path"), "{err}");
    let err = load("logging: {format: xml}", &[]).unwrap_err().to_string();
    assert!(err.contains("logging.format"), "{err}");
}

#[test]
fn refuses_public_listen_without_token() {
    let err = load("http: {host: 0.0.0.0}", &[]).unwrap_err().to_string();
    assert!(err.contains("http.host"), "{err}");
    assert!(load("http: {host: 0.0.0.0}", &[("APP_API_TOKEN", "t0ken")]).is_ok());
    assert!(load("http: {host: '::1'}", &[]).is_ok());
    assert!(load("http: {host: localhost}", &[]).is_ok());
}

#[test]
fn masked_yaml_hides_secrets() {
    let s = load("security: {api_token: hunter2, signing_key: k}", &[]).unwrap();
    let out = s.to_masked_yaml();
    assert!(!out.contains("hunter2") && out.contains("***"), "{out}");
    assert!(!format!("{:?}", s.security).contains("hunter2"));
}

#[test]
fn the_shipped_config_is_the_embedded_defaults_plus_volume_roots() {
    let text = include_str!("../../config/sandboxd.yaml");
    let mut shipped = load(text, &[]).unwrap();
    assert_eq!(
        shipped.sandbox.allowed_volume_roots,
        Some(vec![std::path::PathBuf::from("var/volumes")])
    );
    shipped.sandbox.allowed_volume_roots = None;
    let defaults = load("", &[]).unwrap();
    assert_eq!(shipped.to_masked_yaml(), defaults.to_masked_yaml());
}

#[test]
fn every_env_override_names_a_real_key() {
    let defaults = serde_norway::to_value(Settings::default()).unwrap();
    for (var, key) in ENV_OVERRIDES {
        let known = match key.split_once('.') {
            Some((section, field)) => defaults[section].get(field).is_some(),
            None => defaults.get(*key).is_some(),
        };
        assert!(known, "{var} points at unknown key {key}");
    }
}

#[test]
fn the_backend_is_chosen_by_runtime_and_swarm_refuses_what_it_cannot_do() {
    assert_eq!(load("", &[]).unwrap().runtime, super::RuntimeKind::Docker);
    let s = load("", &[("APP_RUNTIME", "swarm")]).unwrap();
    assert_eq!(s.runtime, super::RuntimeKind::Swarm);
    for (yaml, key) in [
        (
            "runtime: swarm\nsandbox: {publish_agent_port: true}",
            "sandbox.publish_agent_port",
        ),
        (
            "runtime: swarm\ndocker: {base_url: 'https://m:2376'}",
            "docker.base_url",
        ),
        (
            "swarm: {nodes: {n1: {base_url: 'https://n1:2376'}}}",
            "swarm.nodes.n1.tls",
        ),
        (
            "swarm: {nodes: {n1: {base_url: 'n1:2376'}}}",
            "swarm.nodes.n1.base_url",
        ),
        (
            "swarm: {start_timeout_seconds: 0}",
            "swarm.start_timeout_seconds",
        ),
        (
            "runtime: swarm\nsandbox: {idle_hibernate_seconds: 60}",
            "sandbox.idle_hibernate_seconds",
        ),
        (
            "runtime: swarm\nsandbox: {on_expiry: hibernate}",
            "sandbox.on_expiry",
        ),
        (
            "sandbox: {hibernate_stop_seconds: 60}\ndocker: {timeout_seconds: 30}",
            "sandbox.hibernate_stop_seconds",
        ),
        ("sandbox: {on_expiry: sleep}", "sandbox.on_expiry"),
        (
            "sandbox: {hibernated_retention_seconds: 0}",
            "sandbox.hibernated_retention_seconds",
        ),
    ] {
        let e = load(yaml, &[]).unwrap_err().to_string();
        assert!(e.contains(key), "{yaml}: {e}");
    }
    assert!(load(
        "runtime: swarm\nswarm: {nodes: {n1: {base_url: 'https://n1:2376', tls: {ca: /c, cert: /e, key: /k}}}}",
        &[]
    )
    .is_ok());
}

/// Dotted names of every leaf setting (`sandbox.env` is one map-valued setting).
fn leaf_keys() -> Vec<String> {
    fn walk(prefix: &str, v: &serde_norway::Value, out: &mut Vec<String>) {
        match v.as_mapping() {
            Some(map) if !prefix.ends_with(".env") => {
                for (k, v) in map {
                    let k = k.as_str().unwrap_or_default();
                    let name = if prefix.is_empty() {
                        k.to_string()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&name, v, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }
    let mut out = Vec::new();
    walk(
        "",
        &serde_norway::to_value(Settings::default()).unwrap(),
        &mut out,
    );
    out
}

#[test]
fn readme_documents_every_setting_and_its_environment_variable() {
    let readme = include_str!("../../README.md");
    let keys = leaf_keys();
    assert!(keys.len() > 40, "{keys:?}");
    for key in keys {
        assert!(
            readme.contains(&format!("| `{key}` |")),
            "README lacks a row for {key}"
        );
    }
    for (var, _) in ENV_OVERRIDES {
        assert!(readme.contains(&format!("`{var}`")), "README lacks {var}");
    }
}

#[test]
fn ttl_and_network_are_bounded_at_start_naming_the_key() {
    for (yaml, key) in [
        ("sandbox: {ttl_seconds: 0}", "sandbox.ttl_seconds"),
        ("sandbox: {ttl_seconds: 31536001}", "sandbox.ttl_seconds"),
        (
            "sandbox: {ttl_seconds: 18446744073709551615}",
            "sandbox.ttl_seconds",
        ),
        ("sandbox: {network_name: host}", "sandbox.network_name"),
        ("sandbox: {network_name: none}", "sandbox.network_name"),
        ("sandbox: {network_capacity: 0}", "sandbox.network_capacity"),
        (
            "sandbox: {network_capacity: 1024}",
            "sandbox.network_capacity",
        ),
        (
            "sandbox: {network_name: 'container:abc'}",
            "sandbox.network_name",
        ),
    ] {
        let e = load(yaml, &[]).unwrap_err().to_string();
        assert!(e.contains(key), "{yaml}: {e}");
    }
    let e = load("", &[("APP_SANDBOX_TTL_SECONDS", "99999999999")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("sandbox.ttl_seconds"), "{e}");
    assert!(load("sandbox: {ttl_seconds: 31536000}", &[]).is_ok());
}

#[test]
fn token_can_be_made_optional_for_old_clients() {
    let s = load(
        "http: {host: 0.0.0.0}\nsecurity: {api_token: t}",
        &[("APP_API_TOKEN_REQUIRED", "false")],
    )
    .unwrap();
    assert!(!s.security.token_required);
    assert!(Settings::default().security.token_required);
}
