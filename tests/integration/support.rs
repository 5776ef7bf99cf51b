//! Test harness: each test gets its own sandboxd (in-process on 127.0.0.1:0, or the built
//! binary), its own temp dir and database, and its own `controller.instance` label, so tests run
//! in parallel against the one real engine without touching each other. All tests share the
//! `sandboxd-test` network (created by scripts/provision.sh), never one network per test.
//!
//! One copy serves every test binary (`integration`, and by `#[path]` `swarm`,
//! `engine_restart`, `warm_refill`) and the e2e bench (`benches/e2e.rs`).

// Each binary that includes this file uses a part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bollard::models::{ContainerInspectResponse, ContainerSummary};
use bollard::query_parameters::{InspectContainerOptions, ListContainersOptionsBuilder};
use bollard::Docker;
use reqwest::StatusCode;
use sandboxd::app::Application;
use sandboxd::config::{PullPolicy, Settings};
use serde_json::{json, Value};
use tempfile::TempDir;

pub const TEST_NETWORK: &str = "sandboxd-test";
/// A second shared network (scripts/provision.sh), for renaming `sandbox.network_name`.
pub const TEST_NETWORK_ALT: &str = "sandboxd-test-alt";
pub const TEST_IMAGE: &str = "sandboxd/agent-busybox:latest";

/// xorshift64*: a reproducible sequence without another dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub fn unique_instance() -> String {
    format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

pub fn new_chat() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The engine this run of the integration binary tests against: `SANDBOXD_TEST_ENGINE`
/// (`docker`, the default, or `podman`); scripts/test.sh runs the binary once for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Docker,
    Podman,
}

pub fn engine() -> Engine {
    match std::env::var("SANDBOXD_TEST_ENGINE").as_deref() {
        Ok("podman") => Engine::Podman,
        Ok("docker") | Err(_) => Engine::Docker,
        Ok(other) => panic!("SANDBOXD_TEST_ENGINE={other}: docker or podman"),
    }
}

impl Engine {
    /// The engine's API socket (scripts/provision.sh and provision-podman.sh start them).
    pub fn socket(self) -> &'static str {
        match self {
            Engine::Docker => "/var/run/docker.sock",
            Engine::Podman => "/run/podman/podman.sock",
        }
    }

    /// Its command line tool, for the tests' own setup and clean-up.
    pub fn cli(self) -> &'static str {
        match self {
            Engine::Docker => "docker",
            Engine::Podman => "podman",
        }
    }

    /// The host bridge of a (user-defined) network: dockerd names it `br-<id>`, Podman
    /// `podman<n>`, as the engine says.
    pub fn bridge_of(self, network: &str) -> String {
        let format = match self {
            Engine::Docker => "br-{{printf \"%.12s\" .Id}}",
            Engine::Podman => "{{.NetworkInterface}}",
        };
        let out = Command::new(self.cli())
            .args(["network", "inspect", network, "--format", format])
            .output()
            .expect("network inspect");
        assert!(out.status.success(), "network inspect {network}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The chain sandboxd hooks its egress rules into (docs/podman.md says why they differ).
    pub fn forward_hook(self) -> &'static str {
        match self {
            Engine::Docker => "DOCKER-USER",
            Engine::Podman => "FORWARD",
        }
    }

    pub fn runtime(self) -> sandboxd::config::RuntimeKind {
        match self {
            Engine::Docker => sandboxd::config::RuntimeKind::Docker,
            Engine::Podman => sandboxd::config::RuntimeKind::Podman,
        }
    }
}

/// The engine under test, for the tests' own checks.
pub async fn docker() -> Docker {
    Docker::connect_with_unix(engine().socket(), 120, bollard::API_DEFAULT_VERSION)
        .expect("engine socket")
        .negotiate_version()
        .await
        .expect("the engine under test must answer (scripts/test.sh starts it)")
}

/// The keys of the old service's session body (`POST /api/v1/create`).
pub const SESSION_KEYS: [&str; 8] = [
    "session_id",
    "chat_id",
    "agent_id",
    "volume_host_path",
    "container_id",
    "endpoint",
    "status",
    "expires_at",
];

/// An error body's `detail` as text: a string as it is, the old server's validation list as
/// `loc msg (type)` entries joined by `; `.
pub fn detail_text(body: &Value) -> String {
    match &body["detail"] {
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .map(|e| {
                let loc: Vec<String> = e["loc"]
                    .as_array()
                    .map(|l| {
                        l.iter()
                            .map(|p| p.as_str().map_or_else(|| p.to_string(), str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                format!(
                    "{} {} ({})",
                    loc.join("."),
                    e["msg"].as_str().unwrap_or_default(),
                    e["type"].as_str().unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        _ => String::new(),
    }
}

/// A sandboxd on this machine's engine: temp paths, the shared network, the local image, pull
/// policy `never`, any free port; the service's defaults otherwise (what the benches measure).
pub fn local_settings(dir: &Path, instance: &str) -> Settings {
    let mut s = Settings {
        runtime: engine().runtime(),
        ..Default::default()
    };
    s.docker.base_url = format!("unix://{}", engine().socket());
    s.http.port = 0;
    s.docker.pull_policy = PullPolicy::Never;
    s.sandbox.image = TEST_IMAGE.into();
    s.sandbox.network_name = TEST_NETWORK.into();
    s.sandbox.chats_root = dir.join("chats");
    s.sandbox.dependencies_host_path = dir.join("deps");
    s.sandbox.lambda_tools_host_path = dir.join("tools");
    s.database.path = dir.join("sandboxd.db");
    s.storage.root = dir.join("storage");
    s.controller.instance = instance.into();
    s
}

/// Test settings: `local_settings` with a resync every 2 s, extra env, short backoffs and no
/// takeover of the old service's containers.
pub fn test_settings(dir: &Path, instance: &str) -> Settings {
    let mut s = local_settings(dir, instance);
    s.sandbox.cleanup_interval_seconds = 2;
    s.sandbox.env.insert("EXTRA_ONE".into(), "1".into());
    s.sandbox.env.insert("EXTRA_TWO".into(), "two words".into());
    s.controller.backoff_initial_ms = 200;
    s.controller.backoff_max_seconds = 2;
    // The test agent (busybox httpd as PID 1) ignores SIGTERM: every hibernation waits the
    // whole grace before the SIGKILL.
    s.sandbox.hibernate_stop_seconds = 2;
    // Tests share one engine: only the takeover test may adopt old-service containers.
    s.controller.take_over_old_service = false;
    s
}

/// Removes every container and the egress rules of an instance, also when a test panicked.
/// Whatever ran the instance is gone for good by then, so one removal is enough: a `TestApp`
/// waits for its tasks to end, a `ServerProcess` for the firewall calls of the killed binary.
pub struct InstanceGuard(pub String);

impl Drop for InstanceGuard {
    fn drop(&mut self) {
        // An emptied guard (`TestApp::stop` hands the real one on) removes nothing.
        if self.0.is_empty() {
            return;
        }
        remove_containers_matching(&format!("label=sandboxd.instance={}", self.0));
        remove_egress_rules(&self.0);
    }
}

/// Removes an instance's egress chains (they outlive sandboxd by design); again only when a
/// removal failed. Runs the async adapter on a thread of its own: drops happen inside the
/// tests' runtime.
pub fn remove_egress_rules(instance: &str) {
    if instance.is_empty() {
        return;
    }
    let instance = instance.to_string();
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        for _ in 0..3 {
            if rt
                .block_on(sandboxd::egress::iptables::remove(&instance))
                .is_ok()
            {
                return;
            }
        }
    })
    .join();
}

/// `docker rm -f` of every container matching a `docker ps --filter`; best effort (drops).
/// One at a time: `docker rm -f a b c` tears them down in parallel, and dockerd 20.10.24 can
/// deadlock when two containers leave one network at once (see scripts/engine-watchdog.sh).
pub fn remove_containers_matching(filter: &str) {
    remove_containers_with(engine().cli(), filter);
}

/// The same with an engine's tool named (`docker`, `podman`). A filter with an empty value
/// (`label=k=`) removes nothing: Podman reads it as "has the label `k`", which would be every
/// other test's containers too.
pub fn remove_containers_with(cli: &str, filter: &str) {
    if filter.ends_with('=') {
        return;
    }
    if let Ok(out) = Command::new(cli)
        .args(["ps", "-aq", "--filter", filter])
        .output()
    {
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new(cli)
                .args(["rm", "-f", id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// GET, expecting JSON.
pub async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    client
        .get(url)
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("JSON body")
}

/// GET, JSON or nothing: for polls that a server still starting (or already gone) may miss.
pub async fn try_get_json(client: &reqwest::Client, url: &str) -> Option<Value> {
    client.get(url).send().await.ok()?.json().await.ok()
}

/// The `/metrics` series that counts completed reconcile passes: the `_count` of the pass
/// duration histogram (src/metrics.rs), observed once at the end of every pass.
pub const PASSES_METRIC: &str = "sandboxd_reconcile_pass_duration_seconds_count";

/// How many reconcile passes the sandboxd at `base` (`http://host:port`) has completed.
pub async fn passes(client: &reqwest::Client, base: &str) -> Option<u64> {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(PASSES_METRIC)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Waits until the sandboxd at `base` has completed `n` more reconcile passes than it had.
/// For "nothing changed" checks: the passes that would have changed something did run. The
/// first of them may have started before the call; the ones after it did not, and a pass's
/// actions are started before the next pass runs. A pass runs at least once every `resync`
/// (`sandbox.cleanup_interval_seconds`): `n` passes come within `n + 1` periods, plus some
/// slack for a loaded engine.
pub async fn wait_for_passes(client: &reqwest::Client, base: &str, n: u64, resync: Duration) {
    let from = passes(client, base)
        .await
        .unwrap_or_else(|| panic!("no {PASSES_METRIC} in {base}/metrics"));
    let periods = u32::try_from(n + 1).expect("a few passes");
    wait_until(
        resync * periods + Duration::from_secs(10),
        &format!("{n} reconcile passes after the first {from}"),
        || async { (passes(client, base).await? >= from + n).then_some(()) },
    )
    .await;
}

/// GET, expecting text (`/metrics`).
pub async fn get_text(client: &reqwest::Client, url: &str) -> String {
    client
        .get(url)
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("text body")
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub settings: Settings,
    pub docker: Docker,
    pub dir: TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    // Last field: dropped after everything else.
    pub guard: InstanceGuard,
}

/// How long a dropped `TestApp` waits for its app to end: `run_until_stopped` gives its
/// controller and its server 15 s each.
const APP_STOPS_WITHIN: Duration = Duration::from_secs(35);

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(tweak: impl FnOnce(&mut Settings)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let instance = unique_instance();
        let mut settings = test_settings(dir.path(), &instance);
        tweak(&mut settings);
        Self::start(dir, settings).await
    }

    /// Starts (or restarts) an in-process sandboxd over `dir` with `settings`. Needs a
    /// multi-thread runtime: a drop waits for the app's tasks, which other threads run.
    pub async fn start(dir: TempDir, settings: Settings) -> Self {
        assert_eq!(
            tokio::runtime::Handle::current().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::MultiThread,
            "TestApp needs a multi-thread runtime"
        );
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = sandboxd::telemetry::init(&settings.logging, &Default::default());
        }
        let app = Application::build(settings.clone(), None)
            .await
            .expect("build app");
        let addr = app.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async move {
            let _ = rx.await;
        }));
        let guard = InstanceGuard(settings.controller.instance.clone());
        Self {
            addr,
            client: reqwest::Client::new(),
            settings,
            docker: docker().await,
            dir,
            stop: Some(tx),
            task: Some(task),
            guard,
        }
    }

    /// Graceful stop; returns the temp dir so a test can start again over the same database.
    pub async fn stop(mut self) -> (TempDir, Settings, InstanceGuard) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
        let guard = std::mem::replace(&mut self.guard, InstanceGuard(String::new()));
        (dir, self.settings.clone(), guard)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn instance(&self) -> &str {
        &self.settings.controller.instance
    }

    /// Waits until this app has completed `n` more reconcile passes (`wait_for_passes`).
    pub async fn wait_for_passes(&self, n: u64) {
        let resync = Duration::from_secs(self.settings.sandbox.cleanup_interval_seconds);
        wait_for_passes(&self.client, &self.url(""), n, resync).await;
    }

    /// A host directory to use as `volume_host_path`.
    pub fn volume(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join("volumes").join(name);
        std::fs::create_dir_all(&p).expect("volume dir");
        std::fs::canonicalize(p).expect("canonical volume")
    }

    pub async fn create(&self, chat: &str, agent: &str, volume: &Path) -> (StatusCode, Value) {
        let body = json!({"chat_id": chat, "agent_id": agent, "volume_host_path": volume});
        self.post_json("/api/v1/create", &body).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let r = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request");
        read(r).await
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let r = self
            .client
            .put(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request");
        read(r).await
    }

    pub async fn delete(&self, chat: &str) -> (StatusCode, Value) {
        let r = self
            .client
            .delete(self.url(&format!("/api/v1/sandboxes/{chat}")))
            .send()
            .await
            .expect("request");
        read(r).await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("request");
        read(r).await
    }

    /// All containers (any state) labelled for this test's instance.
    pub async fn containers(&self) -> Vec<ContainerSummary> {
        containers_of(&self.docker, self.instance()).await
    }

    pub async fn inspect(&self, id: &str) -> ContainerInspectResponse {
        self.docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .expect("inspect")
    }

    /// Opens the test's database read-only through sqlx, as an operator would with sqlite3.
    pub async fn db_scalar(&self, sql: &'static str) -> i64 {
        db_scalar(&self.settings.database.path, sql).await
    }
}

impl Drop for TestApp {
    /// Stops the app and waits until its task has ended: by then its controller has finished
    /// what it had under way (actions, the pool's starts, the egress keeper's last write), so
    /// nothing of it writes after the guard's clean-up. A drop cannot await: it blocks, in
    /// `block_in_place`, while the runtime's workers run the app down.
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let Some(mut task) = self.task.take() else {
            return;
        };
        let ended = tokio::runtime::Handle::try_current()
            .ok()
            .filter(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
            .is_some_and(|h| {
                tokio::task::block_in_place(|| {
                    h.block_on(tokio::time::timeout(APP_STOPS_WITHIN, &mut task))
                        .is_ok()
                })
            });
        if !ended {
            task.abort();
        }
        // Mounts its warm pool made (slots, claims), undone deepest first, so the temporary
        // directory can go: a member started after a test's own guard ran would leave them.
        let mut left = sandboxd::pool::mounts::mounts_under(self.dir.path());
        left.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in left {
            let _ = rustix::mount::unmount(m.as_str(), rustix::mount::UnmountFlags::DETACH);
        }
    }
}

pub async fn db_scalar(path: &Path, sql: &'static str) -> i64 {
    use sqlx::ConnectOptions;
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .connect()
        .await
        .expect("open db");
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(&mut conn)
        .await
        .expect("query")
}

pub async fn containers_of(docker: &Docker, instance: &str) -> Vec<ContainerSummary> {
    let filters = HashMap::from([("label", vec![format!("sandboxd.instance={instance}")])]);
    if engine() == Engine::Podman {
        return podman_containers(&filters).await;
    }
    docker
        .list_containers(Some(
            ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .expect("list containers")
}

/// Podman's list, read as JSON: it reports states bollard's model does not know (`stopped`,
/// read here as `exited`), which would fail the whole list.
async fn podman_containers(filters: &HashMap<&str, Vec<String>>) -> Vec<ContainerSummary> {
    let raw = sandboxd::backend::raw::RawApi::new(
        &format!("unix://{}", engine().socket()),
        Duration::from_secs(60),
    )
    .expect("podman socket");
    let query = serde_urlencoded::to_string([
        ("all", "true".to_string()),
        ("filters", json!(filters).to_string()),
    ])
    .expect("query");
    let body = raw
        .get("list", &format!("/v1.41/containers/json?{query}"))
        .await
        .expect("list containers");
    let mut listed: Vec<Value> = serde_json::from_slice(&body).expect("a JSON list");
    for c in &mut listed {
        if c["State"] == "stopped" {
            c["State"] = json!("exited");
        }
    }
    serde_json::from_value(Value::Array(listed)).expect("container summaries")
}

async fn read(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let text = r.text().await.unwrap_or_default();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

/// Polls `check` until it returns `Some` or `timeout` passes. Never a fixed sleep.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_until_every(Duration::from_millis(100), timeout, what, check).await
}

/// `wait_until`, polling every `every` (the benches time what they wait for).
pub async fn wait_until_every<T, F, Fut>(
    every: Duration,
    timeout: Duration,
    what: &str,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(every).await;
    }
}

/// True when the agent answers HTTP within 10 s. A container is running before its process
/// listens: under a loaded engine the first tries may be refused.
pub async fn agent_answers(ip: &str, port: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if agent_answers_once(ip, port).await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens a TCP connection and sends a GET; true when the agent answers HTTP.
async fn agent_answers_once(ip: &str, port: u64) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(format!("{ip}:{port}")),
    )
    .await
    else {
        return false;
    };
    if s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).starts_with("HTTP/1.")
}

/// The built `sandboxd` binary, started with a YAML config, killable with SIGKILL.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// `MARK=<this>` is in the server's environment, and so in its children's.
    mark: String,
}

/// The environment variable that marks a server's processes (see `ServerProcess::kill9`).
const MARK: &str = "SANDBOXD_TEST_SERVER";

impl ServerProcess {
    pub async fn start(config: &Path, port: u16) -> Self {
        Self::start_with_env(config, port, &[]).await
    }

    /// The same, with environment variables set for the server (e.g. a `PATH` without
    /// `iptables`).
    pub async fn start_with_env(config: &Path, port: u16, env: &[(&str, &str)]) -> Self {
        let server = Self::spawn(config, port, env);
        let addr = server.addr;
        let client = reqwest::Client::new();
        wait_until(Duration::from_secs(20), "sandboxd health", || {
            let client = client.clone();
            async move {
                let r = client
                    .get(format!("http://{addr}/api/v1/health"))
                    .send()
                    .await
                    .ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
        server
    }

    /// Starts the binary without waiting for it to answer; its output goes to
    /// `<config>.log`.
    pub fn spawn(config: &Path, port: u16, env: &[(&str, &str)]) -> Self {
        let log = std::fs::File::create(config.with_extension("log")).expect("log file");
        let mark = uuid::Uuid::new_v4().simple().to_string();
        let child = Command::new(env!("CARGO_BIN_EXE_sandboxd"))
            .args(["serve", "--config"])
            .arg(config)
            .env(MARK, &mark)
            .envs(env.iter().copied())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn sandboxd");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        Self { child, addr, mark }
    }

    /// SIGKILL, as in a crash. Returns once the firewall calls the server had under way
    /// (`iptables-restore` …, which outlive it and may still write rules) have ended too:
    /// known by the mark they inherited.
    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL on Unix
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while marked_processes(&self.mark) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Whether a live process has `MARK=<mark>` in its environment (a zombie has none).
fn marked_processes(mark: &str) -> bool {
    let wanted = format!("{MARK}={mark}");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        std::fs::read(p.path().join("environ"))
            .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == wanted.as_bytes()))
    })
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Writes the test settings as a YAML config for the binary.
/// What a test of the built binary needs: a temp dir, an instance whose containers are removed
/// at the end, settings on a free port written to a config file, and a volume directory.
pub struct ProcessFixture {
    // Dropped first: containers go before the directory their mounts come from.
    pub guard: InstanceGuard,
    pub settings: Settings,
    pub config: PathBuf,
    pub vol: PathBuf,
    pub port: u16,
    pub dir: TempDir,
}

impl ProcessFixture {
    pub fn new(tweak: impl FnOnce(&mut Settings)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut settings = test_settings(dir.path(), &unique_instance());
        tweak(&mut settings);
        Self::with_settings(dir, settings)
    }

    /// The same for settings of the caller's (on a free port when theirs is 0).
    pub fn with_settings(dir: TempDir, mut settings: Settings) -> Self {
        let guard = InstanceGuard(settings.controller.instance.clone());
        if settings.http.port == 0 {
            settings.http.port = free_port();
        }
        let port = settings.http.port;
        let config = write_config(dir.path(), &settings);
        let vol = dir.path().join("vol");
        std::fs::create_dir_all(&vol).expect("vol");
        Self {
            guard,
            settings,
            config,
            vol,
            port,
            dir,
        }
    }

    pub async fn start(&self) -> ServerProcess {
        ServerProcess::start(&self.config, self.port).await
    }
}

pub fn write_config(dir: &Path, settings: &Settings) -> PathBuf {
    let path = dir.join("sandboxd.yaml");
    std::fs::write(&path, settings.to_yaml()).expect("write config");
    path
}

/// Waits until Docker matches the store exactly: every live row has exactly one running
/// container of its session and is recorded as running, and no container lacks a live row.
/// Returns how long that took and the rows it saw.
pub async fn wait_converged(
    settings: &Settings,
    docker: &Docker,
    timeout: Duration,
) -> (Duration, Vec<sandboxd::store::SandboxRow>) {
    let started = Instant::now();
    let store = sandboxd::store::Store::open(&settings.database.path, Duration::from_secs(5), 1)
        .await
        .expect("open store");
    loop {
        let rows = store.all().await.expect("rows");
        let now = chrono::Utc::now();
        let live: HashMap<String, String> = rows
            .iter()
            .filter(|r| r.is_live(now))
            .map(|r| (r.chat_id.to_string(), r.session_id.to_string()))
            .collect();
        let mut per_chat: HashMap<String, Vec<(String, bool)>> = HashMap::new();
        for c in containers_of(docker, &settings.controller.instance).await {
            let labels = c.labels.clone().unwrap_or_default();
            let chat = labels.get("sandboxd.chat_id").cloned().unwrap_or_default();
            let session = labels
                .get("sandboxd.session_id")
                .cloned()
                .unwrap_or_default();
            let running = c.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING);
            per_chat.entry(chat).or_default().push((session, running));
        }
        let converged = live.iter().all(|(chat, session)| {
            per_chat
                .get(chat)
                .is_some_and(|v| v.len() == 1 && v[0].0 == *session && v[0].1)
        }) && per_chat.keys().all(|chat| live.contains_key(chat))
            && rows
                .iter()
                .all(|r| r.phase == sandboxd::domain::Phase::Running || !r.is_live(now));
        if converged {
            return (started.elapsed(), rows);
        }
        assert!(
            started.elapsed() < timeout,
            "not converged after {timeout:?}: live {live:?}, containers {per_chat:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A network of one test's own, removed when the test ends (with any shards sandboxd made
/// of it): egress rules apply per network, so no other test's sandboxd (nor rules left behind
/// by an aborted earlier run) may be on it.
pub struct OwnNetwork(pub String);

impl OwnNetwork {
    pub fn create() -> Self {
        Self::create_with(&[])
    }

    /// With `network create` options (`--opt …`).
    pub fn create_with(args: &[&str]) -> Self {
        let name = format!(
            "sandboxd-egress-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let out = Command::new(engine().cli())
            .args(["network", "create"])
            .args(args)
            .arg(&name)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(name)
    }
}

impl Drop for OwnNetwork {
    fn drop(&mut self) {
        // The engine releases a removed container's endpoint a moment after `rm -f` returns,
        // and a controller still stopping may have started one more: anything left on this
        // test's own network goes.
        for name in (1..4).map(|n| format!("{}-{n}", self.0)) {
            remove_containers_matching(&format!("network={name}"));
            let _ = Command::new(engine().cli())
                .args(["network", "rm", &name])
                .output();
        }
        for _ in 0..50 {
            remove_containers_matching(&format!("network={}", self.0));
            let out = Command::new(engine().cli())
                .args(["network", "rm", &self.0])
                .output();
            let gone = out.as_ref().is_ok_and(|o| {
                o.status.success() || String::from_utf8_lossy(&o.stderr).contains("not found")
            });
            if gone {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The host's IPv4 filter table, as `iptables-save` prints it.
pub fn iptables_save() -> String {
    String::from_utf8_lossy(
        &Command::new("iptables-save")
            .args(["-t", "filter"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned()
}
