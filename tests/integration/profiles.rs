//! Isolation profiles and egress rules on the real engine and the real host firewall: gVisor
//! (`runsc`), an unregistered runtime, and egress proved from inside sandboxes against targets
//! the test starts itself (a listener on the host behind the network's gateway, and one in a
//! network namespace the test makes and routes through the host).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use reqwest::StatusCode;
use sandboxd::config::{ProfileSettings, Settings};
use serde_json::{json, Value};

use crate::support::*;

fn profile(runtime: &str) -> ProfileSettings {
    ProfileSettings {
        runtime: runtime.into(),
        ..ProfileSettings::default()
    }
}

async fn create_with(app: &TestApp, chat: &str, profile: &str) -> (StatusCode, Value) {
    let body = json!({"chat_id": chat, "agent_id": "a", "volume_host_path": app.volume(chat), "profile": profile});
    app.post_json("/api/v1/create", &body).await
}

async fn sh(app: &TestApp, chat: &str, command: &str) -> Value {
    // Under the whole suite's load `runsc exec` itself sometimes exits 128 before the
    // command runs (seen 1 in 4 full runs; never alone). That is gVisor's exec, not
    // sandboxd: such an answer is retried a bounded number of times, anything else fails.
    let mut attempts = 0;
    loop {
        let (status, out) = app
            .post_json(
                &format!("/api/v1/sandboxes/{chat}/exec"),
                &json!({"command": command, "timeout_seconds": 20}),
            )
            .await;
        attempts += 1;
        let runsc_exec_failed = out
            .to_string()
            .contains("runsc did not terminate successfully");
        if status != StatusCode::OK && runsc_exec_failed && attempts < 3 {
            eprintln!("runsc exec failed under load (attempt {attempts}): {out}");
            continue;
        }
        assert_eq!(status, StatusCode::OK, "{out}");
        return out;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gvisor_profile_runs_under_runsc_and_serves_its_endpoint() {
    let app = TestApp::spawn_with(|s| {
        s.sandbox.profiles.insert("gvisor".into(), profile("runsc"));
    })
    .await;
    let chat = new_chat();
    let (status, body) = create_with(&app, &chat, "gvisor").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let inspect = app.inspect(body["container_id"].as_str().unwrap()).await;
    assert_eq!(
        inspect.host_config.unwrap().runtime.as_deref(),
        Some("runsc")
    );
    let ip = body["endpoint"]["ip"].as_str().unwrap();
    assert!(
        agent_answers(ip, 8000).await,
        "the endpoint serves under gVisor"
    );
    let version = sh(&app, &chat, "cat /proc/version").await;
    assert!(
        version["stdout"]
            .as_str()
            .unwrap()
            .contains("Linux version 4.4.0"),
        "{version}"
    );
    let dmesg = sh(&app, &chat, "dmesg").await;
    assert!(
        dmesg["stdout"].as_str().unwrap().contains("gVisor"),
        "{dmesg}"
    );
    // The view names the profile; switching profiles by PUT replaces the sandbox.
    let (_, view) = app.get(&format!("/api/v1/sandboxes/{chat}")).await;
    assert_eq!(view["profile"]["name"], "gvisor");
    assert_eq!(view["profile"]["runtime"], "runsc");
    let r = app
        .client
        .put(app.url(&format!("/api/v1/sandboxes/{chat}?wait=30")))
        .json(
            &json!({"agent_id": "a", "volume_host_path": app.volume(&chat), "profile": "standard"}),
        )
        .send()
        .await
        .unwrap();
    let applied: Value = r.json().await.unwrap();
    assert_eq!(applied["outcome"], "replaced", "{applied}");
    let (_, view) = app.get(&format!("/api/v1/sandboxes/{chat}")).await;
    assert_eq!(view["profile"]["runtime"], "runc");
    assert_ne!(view["container_id"], body["container_id"]);
    // An old-contract create naming another profile than the live one is not a reuse.
    let (status, _) = create_with(&app, &chat, "gvisor").await;
    assert_eq!(status, StatusCode::CONFLICT);
    // An unknown profile is a 422 naming it; nothing is written.
    let (status, body) = create_with(&app, &new_chat(), "nope").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["detail"][0]["loc"], json!(["body", "profile"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unregistered_runtime_fails_with_backoff_and_readiness_never_falls_back_to_runc() {
    let app = TestApp::spawn_with(|s| {
        s.sandbox
            .profiles
            .insert("ghost".into(), profile("no-such-runtime"));
    })
    .await;
    let chat = new_chat();
    let (status, body) = create_with(&app, &chat, "ghost").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(detail_text(&body).contains("no-such-runtime"), "{body}");
    let (_, view) = app.get(&format!("/api/v1/sandboxes/{chat}")).await;
    assert_eq!(view["phase"], "failed");
    assert!(view["next_attempt_at"].is_string(), "{view}");
    assert!(app
        .containers()
        .await
        .iter()
        .all(|c| c.state != Some(bollard::models::ContainerSummaryStateEnum::RUNNING)));
    let detail = wait_until(
        Duration::from_secs(10),
        "readiness names the runtime",
        || async {
            let (status, body) = app.get("/api/v1/ready").await;
            (status == StatusCode::SERVICE_UNAVAILABLE
                && detail_text(&body).contains("profile ghost"))
            .then(|| detail_text(&body))
        },
    )
    .await;
    assert!(detail.contains("no-such-runtime"), "{detail}");
    // The standard profile still works beside it.
    let (status, _) = create_with(&app, &new_chat(), "standard").await;
    assert_eq!(status, StatusCode::OK);
}

/// A TCP listener on the host answering `hello`; its port.
async fn host_listener() -> u16 {
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            use tokio::io::AsyncWriteExt;
            let _ = s.write_all(b"hello\n").await;
        }
    });
    port
}

/// A network namespace routed through the host, with a listener answering `hello` on
/// `<ip>:8080`. Removed when dropped.
struct NetnsTarget {
    name: String,
    host_if: String,
    ip: String,
    _server: std::process::Child,
}

impl NetnsTarget {
    fn start() -> Self {
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..6];
        let octet = u8::from_str_radix(&tag[..2], 16).unwrap_or(7) % 250 + 1;
        let (name, host_if, ns_if) = (
            format!("sbxt-{tag}"),
            format!("sbxh{tag}"),
            format!("sbxn{tag}"),
        );
        let (host_ip, ip) = (format!("10.213.{octet}.1"), format!("10.213.{octet}.2"));
        let run = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&["netns", "add", &name]);
        run(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        run(&["link", "set", &ns_if, "netns", &name]);
        run(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        run(&["link", "set", &host_if, "up"]);
        run(&[
            "netns",
            "exec",
            &name,
            "ip",
            "addr",
            "add",
            &format!("{ip}/30"),
            "dev",
            &ns_if,
        ]);
        run(&["netns", "exec", &name, "ip", "link", "set", &ns_if, "up"]);
        run(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        run(&[
            "netns", "exec", &name, "ip", "route", "add", "default", "via", &host_ip,
        ]);
        let server = Command::new("ip")
            .args(["netns", "exec", &name, "python3", "-c"])
            .arg("import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('0.0.0.0', 8080))\ns.listen(16)\nwhile True:\n    c,_=s.accept(); c.sendall(b'hello\\n'); c.close()\n")
            .spawn()
            .expect("listener in the namespace");
        Self {
            name,
            host_if,
            ip,
            _server: server,
        }
    }
}

impl Drop for NetnsTarget {
    fn drop(&mut self) {
        let _ = self._server.kill();
        let _ = self._server.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Whether the sandbox gets `hello` from `host:port`.
async fn reaches(app: &TestApp, chat: &str, host: &str, port: u16) -> bool {
    let out = sh(app, chat, &format!("nc -w 3 {host} {port} </dev/null")).await;
    out["stdout"].as_str().unwrap_or_default().contains("hello")
}

/// The rules of the chain sandboxd hooks into that are not its own: the engine's and the
/// operator's, which sandboxd must leave as they were.
fn hook_rules_but_ours() -> Vec<String> {
    let hook = format!("-A {} ", engine().forward_hook());
    iptables_save()
        .lines()
        .filter(|l| l.starts_with(&hook) && !l.contains("-j SBX-") && !l.contains(TEST_RULE))
        .map(str::to_string)
        .collect()
}

/// The comment of rules tests put into a hook chain for a moment (a rule above the jumps).
const TEST_RULE: &str = "sandboxd-test-above";

/// A rule inserted first in a hook chain that matches no traffic (its source is TEST-NET-1),
/// deleted on drop.
struct RuleAbove {
    hook: &'static str,
    rule: Vec<String>,
}

impl RuleAbove {
    fn insert(hook: &'static str, instance: &str) -> Self {
        let comment = format!("{TEST_RULE}-{instance}");
        let rule: Vec<String> = ["-s", "192.0.2.1/32", "-m", "comment", "--comment", &comment]
            .into_iter()
            .chain(["-j", "ACCEPT"])
            .map(String::from)
            .collect();
        let out = Command::new("iptables")
            .args(["-w", "-I", hook, "1"])
            .args(&rule)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        Self { hook, rule }
    }
}

impl Drop for RuleAbove {
    fn drop(&mut self) {
        let _ = Command::new("iptables")
            .args(["-w", "-D", self.hook])
            .args(&self.rule)
            .output();
    }
}

async fn jump_is_first(instance: &str) -> bool {
    sandboxd::egress::iptables::jump_is_first(
        instance,
        sandboxd::egress::Family::V4,
        engine().forward_hook(),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jump_put_below_another_rule_is_moved_first_again() {
    let app = TestApp::spawn_with(|s| {
        s.sandbox.cleanup_interval_seconds = 2;
        s.sandbox.profiles = BTreeMap::from([("standard".into(), ProfileSettings::default())]);
    })
    .await;
    let (status, body) = create_with(&app, &new_chat(), "standard").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(jump_is_first(app.instance()).await);
    // What netavark does at a network's first start (or an operator by hand): a rule above
    // sandboxd's jump, which would accept the sandboxes' traffic before their rules.
    let _above = RuleAbove::insert(engine().forward_hook(), app.instance());
    assert!(!jump_is_first(app.instance()).await);
    let (status, body) = create_with(&app, &new_chat(), "standard").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let reorders_on_start = matches!(engine(), Engine::Podman);
    if reorders_on_start {
        // On an engine that reorders at starts, the start's answer comes after the repair.
        assert!(
            jump_is_first(app.instance()).await,
            "first again at the start"
        );
    } else {
        // Elsewhere within a resync period or two: the host is read back every period.
        wait_until(Duration::from_secs(10), "the jump first again", || async {
            jump_is_first(app.instance()).await.then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_rules_block_the_host_and_private_targets_and_are_kept_true() {
    let listener_port = host_listener().await;
    let target = NetnsTarget::start();
    // Declared first: dropped last, after the sandboxes are gone.
    let network = OwnNetwork::create();
    let egress_network = network.0.clone();
    let hook_rules_before = hook_rules_but_ours();
    let app = TestApp::spawn_with(|s| {
        s.sandbox.network_name = egress_network.clone();
        s.sandbox.cleanup_interval_seconds = 2;
        let open = ProfileSettings {
            deny_cidrs: vec![],
            ..ProfileSettings::default()
        };
        let pinhole = ProfileSettings {
            allow_cidrs: vec![format!("{}/32", target.ip)],
            ..ProfileSettings::default()
        };
        s.sandbox.profiles = BTreeMap::from([
            ("standard".into(), ProfileSettings::default()),
            ("open".into(), open),
            ("pinhole".into(), pinhole),
        ]);
    })
    .await;
    let gateway = {
        let net = app.docker.inspect_network(&network.0, None).await.unwrap();
        net.ipam.unwrap().config.unwrap()[0]
            .gateway
            .clone()
            .unwrap()
    };

    // Control: with no rules (profile `open`), both targets answer.
    let open = new_chat();
    let (status, _) = create_with(&app, &open, "open").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        reaches(&app, &open, &gateway, listener_port).await,
        "control: host listener"
    );
    assert!(
        reaches(&app, &open, &target.ip, 8080).await,
        "control: namespace target"
    );
    assert!(
        !iptables_save().contains(&sandboxd::egress::top_chain(app.instance())),
        "`open` needs no rules"
    );
    app.delete(&open).await;

    // The default profile: both blocked, the endpoint still answers from the host.
    let std_chat = new_chat();
    let (status, body) = create_with(&app, &std_chat, "standard").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        !reaches(&app, &std_chat, &gateway, listener_port).await,
        "host listener blocked"
    );
    assert!(
        !reaches(&app, &std_chat, &target.ip, 8080).await,
        "namespace target blocked"
    );
    assert!(!reaches(&app, &std_chat, "169.254.169.254", 80).await);
    assert!(
        agent_answers(body["endpoint"]["ip"].as_str().unwrap(), 8000).await,
        "endpoint from the host"
    );
    let (_, view) = app.get(&format!("/api/v1/sandboxes/{std_chat}")).await;
    assert!(
        view["profile"]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "host: reject"),
        "{view}"
    );

    // Flushed by hand: open at once, repaired within one resync, counted.
    let top = sandboxd::egress::top_chain(app.instance());
    let out = Command::new("iptables")
        .args(["-w", "-F", &top])
        .output()
        .unwrap();
    assert!(out.status.success());
    // (Whether the sandbox gets through in the moment before the repair depends on when the
    // next verify falls: the control above shows it would. The repair is what is checked.)
    let bridge = engine().bridge_of(&app.settings.sandbox.network_name);
    wait_until(Duration::from_secs(10), "the chain refilled", || async {
        iptables_save()
            .lines()
            .any(|l| l.starts_with(&format!("-A {top} -i {bridge} ")))
            .then_some(())
    })
    .await;
    wait_until(Duration::from_secs(10), "the rules repaired", || async {
        (!reaches(&app, &std_chat, &gateway, listener_port).await).then_some(())
    })
    .await;
    let metrics = get_text(&app.client, &app.url("/metrics")).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sandboxd_egress_repairs_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );

    // A restart leaves the rules in place the whole time: blocked while sandboxd is down.
    let (dir, settings, guard) = app.stop().await;
    let hook = engine().forward_hook();
    assert!(iptables_save().contains(&format!("-A {hook} -j {top}")));
    let app_down_probe = Command::new(engine().cli())
        .args(["exec", body["container_id"].as_str().unwrap(), "sh", "-c"])
        .arg(format!("nc -w 3 {gateway} {listener_port} </dev/null"))
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&app_down_probe.stdout).contains("hello"),
        "blocked while sandboxd is down"
    );
    let app = TestApp::start(dir, settings).await;
    let _guard = guard;
    assert!(!reaches(&app, &std_chat, &gateway, listener_port).await);

    // `allow_cidrs` opens exactly its entry (rules are per network: the default sandbox goes
    // first, or the strictest combination would keep the pinhole shut).
    app.delete(&std_chat).await;
    let pin = new_chat();
    let (status, _) = create_with(&app, &pin, "pinhole").await;
    assert_eq!(status, StatusCode::OK);
    // A network's rules loosen one resync period after its stricter sandbox left (that
    // sandbox's container may still have been running a moment ago).
    wait_until(
        Duration::from_secs(10),
        "allow_cidrs entry reachable",
        || async { reaches(&app, &pin, &target.ip, 8080).await.then_some(()) },
    )
    .await;
    assert!(
        !reaches(&app, &pin, &gateway, listener_port).await,
        "the host stays blocked"
    );

    // Removed with the last sandbox; Docker's own rules untouched throughout.
    app.delete(&pin).await;
    wait_until(
        Duration::from_secs(10),
        "the rules removed with the sandboxes",
        || async { (!iptables_save().contains(&top)).then_some(()) },
    )
    .await;
    assert_eq!(hook_rules_but_ours(), hook_rules_before);
    // Stopped before the network goes, so no start under way can make it again.
    let (_dir, _settings, guard) = app.stop().await;
    drop(guard);
    drop(_guard);
    drop(network);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_whose_rules_cannot_be_applied_never_starts() {
    let dir = tempfile::tempdir().unwrap();
    let instance = unique_instance();
    let _guard = InstanceGuard(instance.clone());
    let mut settings: Settings = test_settings(dir.path(), &instance);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    settings.http.port = port;
    let config = dir.path().join("sandboxd.yaml");
    std::fs::write(&config, settings.to_yaml()).unwrap();
    // No iptables on this server's PATH: the host "cannot apply rules".
    let server = ServerProcess::start_with_env(&config, port, &[("PATH", "/nonexistent")]).await;
    let vol = dir.path().join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    let chat = new_chat();
    let r = reqwest::Client::new()
        .post(format!("http://{}/api/v1/create", server.addr))
        .json(&json!({"chat_id": chat, "agent_id": "a", "volume_host_path": vol}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = r.json().await.unwrap();
    assert!(
        detail_text(&body).contains("egress rules cannot be applied"),
        "{body}"
    );
    let docker = docker().await;
    assert!(
        containers_of(&docker, &instance).await.is_empty(),
        "nothing started unprotected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_network_that_does_not_exist_yet_is_made_before_its_rules() {
    // Dropped last: removes the network once the app (and its containers) are gone.
    let network = OwnNetwork(format!(
        "sandboxd-egress-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    let net_name = network.0.clone();
    let app = TestApp::spawn_with(|s| {
        let own = ProfileSettings {
            network: Some(net_name.clone()),
            ..ProfileSettings::default()
        };
        s.sandbox.profiles.insert("own".into(), own);
    })
    .await;
    let chat = new_chat();
    let (status, body) = create_with(&app, &chat, "own").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let inspect = app.inspect(body["container_id"].as_str().unwrap()).await;
    let networks = inspect.network_settings.unwrap().networks.unwrap();
    assert!(networks.contains_key(&network.0), "{networks:?}");
    let bridge = engine().bridge_of(&network.0);
    let top = sandboxd::egress::top_chain(app.instance());
    assert!(
        iptables_save().contains(&format!("-A {top} -i {bridge} ")),
        "the new network's rules are in place"
    );
    // Stopped before the network goes, so no start under way can make it again.
    let (_dir, _settings, guard) = app.stop().await;
    drop(guard);
    drop(network);
}
