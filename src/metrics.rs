//! Prometheus metrics (`prometheus-client`), served at `GET /metrics`.
//!
//! The old service's signals keep their meaning under Prometheus names
//! (`sandbox.create.total{result}` → `sandbox_create_total{result}`, …); controller signals are
//! prefixed `sandboxd_`. Labels are fixed, small sets (results, operations, phases), never ids.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpResultLabels {
    pub operation: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StartLabel {
    pub start: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub kind: &'static str,
    pub outcome: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Time to running: 50 ms to about 7 minutes.
fn running_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.05, 2.0, 14))
}

fn latency_histogram() -> Histogram {
    // 1 ms … ~32 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Every metric sandboxd exports.
pub struct Metrics {
    registry: Registry,
    pub create_total: Family<ResultLabel, Counter>,
    pub delete_total: Family<ResultLabel, Counter>,
    pub cleanup_total: Counter,
    pub cleanup_errors_total: Counter,
    pub active: Gauge,
    pub docker_call_seconds: HistogramFamily<OpResultLabels>,
    pub docker_errors_total: Family<OpLabel, Counter>,
    pub desired: Family<PhaseLabel, Gauge>,
    pub observed: Family<StateLabel, Gauge>,
    pub pass_seconds: Histogram,
    pub pass_errors_total: Counter,
    pub actions_total: Family<ActionLabels, Counter>,
    pub queue_depth: Gauge,
    pub retries_total: Counter,
    /// From a session's desired-state write to its container running, by `start`
    /// (`warm`: a pool member was claimed; `cold`).
    pub time_to_running_seconds: HistogramFamily<StartLabel>,
    /// Resumes of paused or hibernated sandboxes, engine calls included.
    pub resume_seconds: Histogram,
    /// Resumes that failed and fell back to a cold start.
    pub resume_fallbacks_total: Counter,
    pub events_connected: Gauge<i64>,
    pub docker_connected: Gauge<i64>,
    pub last_pass_timestamp: Gauge<f64, AtomicU64>,
    /// Data-plane calls (exec, file read/write/list) holding a concurrency slot.
    pub data_plane_in_flight: Gauge<i64>,
    /// Background processes sandboxd started that still run (and whose output it reads).
    pub processes_running: Gauge<i64>,
    /// Terminals open (attached, or waiting in their grace period for a re-attach).
    pub terminals_open: Gauge<i64>,
    /// File watches open (each an inotify instance on the host).
    pub file_watches_open: Gauge<i64>,
    /// Chat storage writes refused by a workspace's quota (413).
    pub storage_quota_refusals_total: Counter,
    /// Bytes in use on every workspace's file system together (every resync period).
    pub storage_used_bytes: Gauge<i64>,
    /// Workspaces by how full they are (`under_50`, `50_to_80`, `80_to_95`, `over_95`,
    /// `unmounted`): a bounded label set, every resync period.
    pub storage_workspaces: Family<StateLabel, Gauge>,
    /// Finished execs by result (`ok`, `timeout`, `abandoned`, `error`).
    pub exec_total: Family<ResultLabel, Counter>,
    /// Starts by how they went: `warm`, or `cold` with why (`pool_empty`, `pool_off`, …).
    pub starts_total: Family<ResultLabel, Counter>,
    /// Warm-pool members by state (`idle`, `starting`, `claimed`).
    pub pool_members: Family<StateLabel, Gauge>,
    /// Egress rules found changed on the host and rewritten.
    pub egress_repairs_total: Counter,
    /// Sandboxes' containers that stopped on their own, by what followed (`restart` at once,
    /// or `backoff`: a quick exit again, a crash loop).
    pub sandbox_exits_total: Family<ResultLabel, Counter>,
    /// Lines in the event log (counted after each retention pass and at start).
    pub event_log_rows: Gauge<i64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let m = Self {
            create_total: Family::default(),
            delete_total: Family::default(),
            cleanup_total: Counter::default(),
            cleanup_errors_total: Counter::default(),
            active: Gauge::default(),
            docker_call_seconds: HistogramFamily::new_with_constructor(latency_histogram),
            docker_errors_total: Family::default(),
            desired: Family::default(),
            observed: Family::default(),
            pass_seconds: latency_histogram(),
            pass_errors_total: Counter::default(),
            actions_total: Family::default(),
            queue_depth: Gauge::default(),
            retries_total: Counter::default(),
            time_to_running_seconds: HistogramFamily::new_with_constructor(running_histogram),
            resume_seconds: latency_histogram(),
            resume_fallbacks_total: Counter::default(),
            events_connected: Gauge::default(),
            docker_connected: Gauge::default(),
            last_pass_timestamp: Gauge::default(),
            data_plane_in_flight: Gauge::default(),
            processes_running: Gauge::default(),
            terminals_open: Gauge::default(),
            file_watches_open: Gauge::default(),
            storage_quota_refusals_total: Counter::default(),
            storage_used_bytes: Gauge::default(),
            storage_workspaces: Family::default(),
            exec_total: Family::default(),
            starts_total: Family::default(),
            pool_members: Family::default(),
            egress_repairs_total: Counter::default(),
            sandbox_exits_total: Family::default(),
            event_log_rows: Gauge::default(),
            registry: Registry::default(),
        };
        r.register(
            "sandbox_create",
            "POST /api/v1/create calls by result",
            m.create_total.clone(),
        );
        r.register(
            "sandbox_delete",
            "DELETE /api/v1/sandboxes/{chat_id} calls by result",
            m.delete_total.clone(),
        );
        r.register(
            "sandbox_cleanup",
            "Expired sandboxes removed",
            m.cleanup_total.clone(),
        );
        r.register(
            "sandbox_cleanup_errors",
            "Failed removals of expired sandboxes",
            m.cleanup_errors_total.clone(),
        );
        r.register(
            "sandbox_active_count",
            "Sandboxes recorded as running",
            m.active.clone(),
        );
        r.register(
            "sandbox_runtime_duration_seconds",
            "Docker API call duration by operation and result",
            m.docker_call_seconds.clone(),
        );
        r.register(
            "sandbox_runtime_errors",
            "Failed Docker API calls by operation",
            m.docker_errors_total.clone(),
        );
        r.register(
            "sandboxd_desired_sandboxes",
            "Rows in the store by phase",
            m.desired.clone(),
        );
        r.register(
            "sandboxd_observed_containers",
            "Containers of this instance by state",
            m.observed.clone(),
        );
        r.register(
            "sandboxd_starts",
            "Sandbox starts: warm (a pool member claimed) or cold, with why",
            m.starts_total.clone(),
        );
        r.register(
            "sandboxd_pool_members",
            "Warm-pool members by state",
            m.pool_members.clone(),
        );
        r.register(
            "sandboxd_reconcile_pass_duration_seconds",
            "Duration of one reconcile pass (read, list, plan)",
            m.pass_seconds.clone(),
        );
        r.register(
            "sandboxd_reconcile_pass_errors",
            "Reconcile passes that failed",
            m.pass_errors_total.clone(),
        );
        r.register(
            "sandboxd_actions",
            "Controller actions by kind and outcome",
            m.actions_total.clone(),
        );
        r.register(
            "sandboxd_queue_depth",
            "Actions in flight or waiting for a slot",
            m.queue_depth.clone(),
        );
        r.register(
            "sandboxd_retries",
            "Actions that failed and were scheduled again with backoff",
            m.retries_total.clone(),
        );
        r.register(
            "sandboxd_time_to_running_seconds",
            "From the desired-state write of a session to its container running",
            m.time_to_running_seconds.clone(),
        );
        r.register(
            "sandboxd_resume_seconds",
            "Resumes of paused or hibernated sandboxes (unpause or start, address read)",
            m.resume_seconds.clone(),
        );
        r.register(
            "sandboxd_resume_fallbacks",
            "Resumes that failed and fell back to a cold start of the session",
            m.resume_fallbacks_total.clone(),
        );
        r.register(
            "sandboxd_docker_events_connected",
            "1 while the Docker event stream is connected",
            m.events_connected.clone(),
        );
        r.register(
            "sandboxd_docker_connected",
            "1 while the Docker engine answers",
            m.docker_connected.clone(),
        );
        r.register(
            "sandboxd_last_pass_timestamp_seconds",
            "Unix time of the last completed reconcile pass",
            m.last_pass_timestamp.clone(),
        );
        r.register(
            "sandboxd_data_plane_in_flight",
            "Data-plane calls (exec, files) in flight",
            m.data_plane_in_flight.clone(),
        );
        r.register(
            "sandboxd_sandbox_exits",
            "Sandbox containers that stopped on their own, by what followed (restart, backoff)",
            m.sandbox_exits_total.clone(),
        );
        r.register(
            "sandboxd_event_log_rows",
            "Lines in the event log (after each retention pass)",
            m.event_log_rows.clone(),
        );
        r.register(
            "sandboxd_processes_running",
            "Background processes running, their output read by sandboxd",
            m.processes_running.clone(),
        );
        r.register(
            "sandboxd_terminals_open",
            "Terminals open, attached or in their re-attach grace period",
            m.terminals_open.clone(),
        );
        r.register(
            "sandboxd_file_watches_open",
            "File watches open, each an inotify instance on the host",
            m.file_watches_open.clone(),
        );
        r.register(
            "sandboxd_storage_quota_refusals",
            "Chat storage writes refused by a workspace's quota",
            m.storage_quota_refusals_total.clone(),
        );
        r.register(
            "sandboxd_storage_used_bytes",
            "Bytes in use on every workspace's file system together",
            m.storage_used_bytes.clone(),
        );
        r.register(
            "sandboxd_storage_workspaces",
            "Workspaces by how full they are (under_50, 50_to_80, 80_to_95, over_95, unmounted)",
            m.storage_workspaces.clone(),
        );
        r.register(
            "sandboxd_exec",
            "Finished execs by result (ok, timeout, abandoned, error)",
            m.exec_total.clone(),
        );
        r.register(
            "sandboxd_egress_repairs",
            "Egress rules found changed on the host and rewritten",
            m.egress_repairs_total.clone(),
        );
        let m = Self { registry: r, ..m };
        m.zero_known_series();
        m
    }

    /// Every series whose label values are known up front starts at zero, so that rates,
    /// dashboards and alert rules see it before its first event (a family without a child
    /// is not exported at all).
    fn zero_known_series(&self) {
        let result = |r: &'static str| ResultLabel { result: r };
        for r in [
            "created", "reused", "replaced", "conflict", "error", "timeout", "invalid",
        ] {
            let _ = self.create_total.get_or_create(&result(r));
        }
        for r in ["deleted", "not_found", "error", "timeout"] {
            let _ = self.delete_total.get_or_create(&result(r));
        }
        for r in ["restart", "backoff"] {
            let _ = self.sandbox_exits_total.get_or_create(&result(r));
        }
        for r in [
            "warm",
            "pool_empty",
            "pool_off",
            "class_mismatch",
            "pool_error",
            "claim_failed",
        ] {
            let _ = self.starts_total.get_or_create(&result(r));
        }
        for r in ["ok", "timeout", "abandoned", "error"] {
            let _ = self.exec_total.get_or_create(&result(r));
        }
        for start in ["warm", "cold"] {
            let _ = self
                .time_to_running_seconds
                .get_or_create(&StartLabel { start });
        }
        for state in ["idle", "starting", "claimed"] {
            let _ = self.pool_members.get_or_create(&StateLabel { state });
        }
        for state in ["under_50", "50_to_80", "80_to_95", "over_95", "unmounted"] {
            let _ = self.storage_workspaces.get_or_create(&StateLabel { state });
        }
        for outcome in ["ok", "error", "skipped"] {
            let _ = self.actions_total.get_or_create(&ActionLabels {
                kind: "start",
                outcome,
            });
        }
    }

    /// Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    pub fn docker_call(&self, operation: &'static str, ok: bool, took: Duration) {
        let result = if ok { "ok" } else { "error" };
        self.docker_call_seconds
            .get_or_create(&OpResultLabels { operation, result })
            .observe(took.as_secs_f64());
        if !ok {
            self.docker_errors_total
                .get_or_create(&OpLabel { operation })
                .inc();
        }
    }

    pub fn action(&self, kind: &'static str, outcome: &'static str) {
        self.actions_total
            .get_or_create(&ActionLabels { kind, outcome })
            .inc();
    }

    pub fn create(&self, result: &'static str) {
        self.create_total
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    pub fn delete(&self, result: &'static str) {
        self.delete_total
            .get_or_create(&ResultLabel { result })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_old_names() {
        let m = Metrics::new();
        m.create("created");
        m.delete("not_found");
        m.docker_call("create", false, Duration::from_millis(3));
        let text = m.encode();
        for name in [
            "sandbox_create_total{result=\"created\"} 1",
            "sandbox_delete_total{result=\"not_found\"} 1",
            "sandbox_runtime_errors_total{operation=\"create\"} 1",
            "sandbox_active_count",
            "sandboxd_reconcile_pass_duration_seconds_bucket",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }
}
