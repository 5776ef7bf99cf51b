//! The controller's moving parts (supervisor, scheduler, runner, executor, warm pool) on the
//! in-memory fake backend: convergence, adoption, orphans, the crash-loop backoff, retries at
//! `next_attempt_at`, reconnects after the engine went away, lost events, racing warm claims.
//! Fast and deterministic in what they check; the same behaviours are tested against real
//! engines in `tests/`. Every wait is for a state (a row, a container, a pass), bounded.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{watch, Notify};

use super::{Controller, ControllerStatus};
use crate::backend::fake::{FakeBackend, FakeContainer};
use crate::config::spec::resolve;
use crate::config::Settings;
use crate::context::Context;
use crate::domain::volume::VolumePolicy;
use crate::domain::{ChatId, Phase, SessionId};
use crate::store::{NewSession, SandboxRow, Store};

const INSTANCE: &str = "unit";
/// Long enough for a loaded CI machine, short enough that a hang is seen.
const WAIT: Duration = Duration::from_secs(20);

/// Polls `$check` (an expression giving an `Option`) until it is `Some`, at most [`WAIT`].
macro_rules! until {
    ($h:expr, $what:expr, $check:expr) => {{
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(v) = $check {
                break v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {}; containers: {:?}",
                $what,
                $h.fake.containers()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }};
}

struct Harness {
    store: Store,
    fake: FakeBackend,
    settings: Arc<Settings>,
    status: Arc<ControllerStatus>,
    wake: Arc<Notify>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    dir: tempfile::TempDir,
}

impl Harness {
    async fn start(tweak: impl FnOnce(&mut Settings)) -> Self {
        Self::start_on(FakeBackend::new(INSTANCE), tweak).await
    }

    async fn start_on(fake: FakeBackend, tweak: impl FnOnce(&mut Settings)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Settings::default();
        s.controller.instance = INSTANCE.into();
        s.controller.backoff_initial_ms = 100;
        s.controller.backoff_max_seconds = 1;
        s.controller.take_over_old_service = false;
        s.sandbox.cleanup_interval_seconds = 1;
        s.sandbox.chats_root = dir.path().join("chats");
        s.sandbox.dependencies_host_path = dir.path().join("deps");
        s.sandbox.lambda_tools_host_path = dir.path().join("tools");
        s.database.path = dir.path().join("sandboxd.db");
        s.warm_pool.min_idle = 0;
        s.warm_pool.root = dir.path().join("pool");
        tweak(&mut s);
        for d in [
            &s.sandbox.chats_root,
            &s.sandbox.dependencies_host_path,
            &s.sandbox.lambda_tools_host_path,
        ] {
            std::fs::create_dir_all(d).expect("host directory");
        }
        let store = Store::open(&s.database.path, Duration::from_secs(5), 2)
            .await
            .expect("store");
        store.migrate().await.expect("migrate");
        let store = store.serve_reads_from_memory().await.expect("mirror");
        let ctx = Arc::new(Context::new(
            store.clone(),
            Arc::new(s),
            Arc::new(VolumePolicy::default()),
        ));
        let (settings, status, wake) = (ctx.settings.clone(), ctx.status.clone(), ctx.wake.clone());
        let (stop, stopped) = watch::channel(false);
        let controller = Controller {
            ctx,
            connector: Arc::new(fake.clone()),
        };
        let task = tokio::spawn(controller.run(stopped));
        Self {
            store,
            fake,
            settings,
            status,
            wake,
            stop,
            task: Some(task),
            dir,
        }
    }

    /// Writes a desired sandbox for a new chat, as the API does, and wakes the loop.
    async fn want(&self, ttl_seconds: i64) -> ChatId {
        let chat = ChatId(uuid::Uuid::new_v4());
        let vol = self.dir.path().join(format!("vol-{}", chat.0.simple()));
        std::fs::create_dir_all(&vol).expect("volume");
        let spec = resolve(&self.settings.sandbox, chat, "agent", &vol, None);
        let new = NewSession {
            state: crate::domain::hibernation::SandboxState::Running,
            chat_id: chat,
            agent_id: "agent".into(),
            volume_host_path: vol.display().to_string(),
            spec_json: serde_json::to_string(&spec).expect("spec"),
            spec_hash: spec.hash(),
            ttl: chrono::Duration::seconds(ttl_seconds),
            profile: None,
        };
        self.store
            .apply(&new, Utc::now(), chrono::Duration::days(7))
            .await
            .expect("apply");
        self.wake.notify_one();
        chat
    }

    async fn row(&self, chat: ChatId) -> Option<SandboxRow> {
        self.store.get(chat).await.expect("row")
    }

    /// The chat's row once it runs.
    async fn running(&self, chat: ChatId) -> SandboxRow {
        until!(self, "running", {
            self.row(chat)
                .await
                .filter(|r| r.phase == Phase::Running && r.container_id.is_some())
        })
    }

    /// Waits for `n` more completed passes: a check that nothing changed needs them to have
    /// happened.
    async fn passes(&self, n: usize) {
        for _ in 0..n {
            let before = self.status.snapshot().last_pass;
            self.wake.notify_one();
            until!(self, "a pass", {
                (self.status.snapshot().last_pass > before).then_some(())
            });
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(WAIT, t).await;
        }
    }
}

impl Drop for Harness {
    /// Undoes the warm pool's slot mounts (claimed members keep theirs by design), so the
    /// temporary directory can go, however the test ended.
    fn drop(&mut self) {
        let root = self.settings.warm_pool.root.clone();
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let slot = entry.file_name().to_string_lossy().into_owned();
            let _ = crate::pool::mounts::Slot::new(&root, &slot).remove();
        }
    }
}

fn ours(fake: &FakeBackend, chat: ChatId) -> Vec<FakeContainer> {
    fake.containers()
        .into_iter()
        .filter(|c| c.chat_id == Some(chat))
        .collect()
}

#[tokio::test]
async fn desired_sandboxes_converge_and_a_converged_world_stays_put() {
    let h = Harness::start(|_| {}).await;
    let chats = [h.want(300).await, h.want(300).await, h.want(300).await];
    for chat in chats {
        let row = h.running(chat).await;
        let c = ours(&h.fake, chat);
        assert_eq!(c.len(), 1, "one container per chat");
        assert_eq!(row.container_id.as_deref(), Some(c[0].id.as_str()));
        assert_eq!(row.endpoint_ip, c[0].ip);
    }
    let (creates, starts) = (h.fake.count("create"), h.fake.count("start"));
    h.passes(3).await;
    assert_eq!(h.fake.count("create"), creates, "nothing created again");
    assert_eq!(h.fake.count("start"), starts, "nothing started again");
    assert_eq!(h.fake.count("remove"), 0);
    h.stop().await;
}

#[tokio::test]
async fn a_crash_loop_is_restarted_at_once_then_with_growing_backoff() {
    // A backoff long enough that the test sees the wait even on a loaded machine.
    let h = Harness::start(|s| {
        s.controller.backoff_initial_ms = 1000;
        s.controller.backoff_max_seconds = 30;
    })
    .await;
    let chat = h.want(300).await;
    let first = h.running(chat).await;
    // The first exit in a row is restarted at once.
    h.fake.crash(first.container_id.as_deref().unwrap(), 3);
    let second = until!(h, "the first restart", {
        h.row(chat)
            .await
            .filter(|r| r.restarts == 1 && r.phase == Phase::Running)
    });
    assert_ne!(second.container_id, first.container_id, "a new container");
    // A second quick exit waits its backoff: the row says when, and nothing runs before.
    let crashed_at = Utc::now();
    h.fake.crash(second.container_id.as_deref().unwrap(), 3);
    let waiting = until!(h, "a backoff", {
        h.row(chat).await.filter(|r| r.next_attempt_at.is_some())
    });
    let due = waiting.next_attempt_at.unwrap();
    assert!(
        due > crashed_at,
        "the retry waits: due {due}, crashed {crashed_at}"
    );
    assert!(
        waiting.last_error.as_deref().unwrap_or("").contains('3'),
        "the exit code is named: {:?}",
        waiting.last_error
    );
    let third = until!(h, "the second restart", {
        h.row(chat)
            .await
            .filter(|r| r.restarts == 2 && r.phase == Phase::Running)
    });
    assert!(
        third.running_since.unwrap() >= due,
        "restarted at next_attempt_at ({due}), not before ({:?})",
        third.running_since
    );
    assert_eq!(h.fake.running().len(), 1, "one container per chat");
    h.stop().await;
}

#[tokio::test]
async fn a_refused_create_is_recorded_and_retried_at_next_attempt_at() {
    // Retries a second apart: the test sees the recorded failure even on a loaded machine.
    let h = Harness::start(|s| s.controller.backoff_initial_ms = 1000).await;
    h.fake.refuse_creates(2);
    let chat = h.want(300).await;
    let failed = until!(h, "a recorded failure", {
        h.row(chat).await.filter(|r| r.attempts >= 1)
    });
    assert!(
        failed
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("injected failure"),
        "{:?}",
        failed.last_error
    );
    assert!(failed.next_attempt_at.is_some());
    let row = h.running(chat).await;
    assert_eq!(h.fake.count("create"), 3, "two refused, one made");
    assert_eq!(row.attempts, 0, "a success resets the count");
    assert_eq!(row.last_error, None);
    h.stop().await;
}

#[tokio::test]
async fn a_failed_start_removes_what_it_created() {
    let h = Harness::start(|_| {}).await;
    h.fake.fail_starts(1);
    let chat = h.want(300).await;
    h.running(chat).await;
    assert_eq!(ours(&h.fake, chat).len(), 1, "the failed one was removed");
    assert!(h.fake.count("remove") >= 1);
    h.stop().await;
}

#[tokio::test]
async fn the_supervisor_reconnects_when_the_engine_comes_back() {
    let fake = FakeBackend::new(INSTANCE);
    fake.set_down(true);
    let h = Harness::start_on(fake, |_| {}).await;
    let chat = h.want(300).await;
    // Down from the start: connects are retried (with backoff), the row fails fast.
    until!(h, "three connect attempts", {
        (h.fake.connects() >= 3).then_some(())
    });
    assert!(!h.status.snapshot().engine_connected);
    assert!(h.row(chat).await.unwrap().phase != Phase::Running);
    h.fake.set_down(false);
    let row = h.running(chat).await;
    assert!(h.status.snapshot().engine_connected);
    // Gone while connected: the failed call makes the supervisor connect again.
    let connects = h.fake.connects();
    h.fake.set_down(true);
    h.wake.notify_one();
    until!(h, "a reconnect after a failed call", {
        (h.fake.connects() > connects).then_some(())
    });
    h.fake.set_down(false);
    h.passes(2).await;
    let after = h.running(chat).await;
    assert_eq!(
        after.container_id, row.container_id,
        "the running sandbox was left alone"
    );
    assert_eq!(h.fake.count("create"), 1);
    h.stop().await;
}

#[tokio::test]
async fn a_crash_whose_event_was_lost_is_found_by_the_resync() {
    let h = Harness::start(|_| {}).await;
    let chat = h.want(300).await;
    let first = h.running(chat).await;
    h.fake.lose_events(true);
    h.fake.crash(first.container_id.as_deref().unwrap(), 1);
    // No event, no wake from the test: only the periodic resync can see it.
    // The exit is counted (restarts = 1) a moment before the new container is recorded.
    let again = until!(h, "a restart without an event", {
        h.row(chat).await.filter(|r| {
            r.restarts == 1 && r.phase == Phase::Running && r.container_id != first.container_id
        })
    });
    assert!(again.container_id.is_some());
    h.stop().await;
}

#[tokio::test]
async fn a_container_made_before_a_crash_is_adopted_not_duplicated() {
    // Another process created (and started) the session's container, then died before it
    // recorded it: the name is taken by ours, for this session and spec.
    let fake = FakeBackend::new(INSTANCE);
    let h = Harness::start_on(fake.clone(), |_| {}).await;
    fake.set_down(true);
    let chat = h.want(300).await;
    let row = h.row(chat).await.unwrap();
    fake.add_container(FakeContainer {
        id: "made-before".into(),
        name: crate::backend::labels::container_name(INSTANCE, chat, row.session_id),
        ours: true,
        chat_id: Some(chat),
        session_id: Some(row.session_id),
        spec_hash: Some(row.spec_hash.clone()),
        image: "img".into(),
        running: true,
        ip: Some("10.99.0.200".into()),
        exit: None,
        starts: 1,
        ..FakeContainer::default()
    });
    fake.set_down(false);
    let running = h.running(chat).await;
    assert_eq!(running.container_id.as_deref(), Some("made-before"));
    assert_eq!(fake.count("create"), 0, "adopted, never created");
    assert_eq!(fake.containers()[0].starts, 1, "never restarted");
    h.stop().await;
}

#[tokio::test]
async fn orphans_of_this_instance_go_and_foreign_containers_stay() {
    let fake = FakeBackend::new(INSTANCE);
    let orphan = |id: &str, ours: bool| FakeContainer {
        id: id.into(),
        name: id.into(),
        ours,
        chat_id: Some(ChatId(uuid::Uuid::new_v4())),
        session_id: Some(SessionId(uuid::Uuid::new_v4())),
        spec_hash: Some("h".into()),
        image: "img".into(),
        running: true,
        ip: Some("10.99.1.2".into()),
        exit: None,
        starts: 1,
        ..FakeContainer::default()
    };
    fake.add_container(orphan("orphan", true));
    fake.add_container(orphan("foreign", false));
    let h = Harness::start_on(fake.clone(), |_| {}).await;
    until!(h, "the orphan's removal", {
        (!h.fake.containers().iter().any(|c| c.id == "orphan")).then_some(())
    });
    h.passes(2).await;
    assert!(fake.containers().iter().any(|c| c.id == "foreign"));
    h.stop().await;
}

#[tokio::test]
async fn a_missing_image_fails_with_its_name_and_recovers_when_it_appears() {
    let h = Harness::start(|_| {}).await;
    let image = h.settings.sandbox.image.clone();
    h.fake.set_image_missing(&image, true);
    let chat = h.want(300).await;
    let failed = until!(h, "the image error", {
        h.row(chat).await.filter(|r| r.last_error.is_some())
    });
    assert!(failed.last_error.unwrap().contains(&image));
    h.fake.set_image_missing(&image, false);
    h.running(chat).await;
    h.stop().await;
}

#[tokio::test]
async fn an_expired_sandbox_is_removed() {
    let h = Harness::start(|_| {}).await;
    let chat = h.want(2).await;
    let row = h.running(chat).await;
    let id = row.container_id.unwrap();
    until!(h, "the expiry's removal", {
        (!h.fake.containers().iter().any(|c| c.id == id)).then_some(())
    });
    h.stop().await;
}

/// Warm claims on the fake: members are started ahead, a burst of new chats takes each idle
/// member exactly once (the store's atomic take), the rest start cold, and the pool refills.
/// The claims' host side is the real one (slot mounts under a temporary root, the env file,
/// the `go` signal on the member's FIFO), so this needs root, as the pool itself does.
#[tokio::test]
async fn racing_creates_claim_each_warm_member_once_and_the_rest_start_cold() {
    use crate::store::MemberState;
    let fake = FakeBackend::new(INSTANCE);
    fake.offer_warm_starts();
    let h = Harness::start_on(fake, |s| {
        s.warm_pool.min_idle = 3;
        s.warm_pool.max = 3;
    })
    .await;
    let members_in = |state: MemberState| {
        let store = h.store.clone();
        async move {
            store
                .pool_members()
                .await
                .expect("members")
                .into_iter()
                .filter(|m| m.state == state)
                .collect::<Vec<_>>()
        }
    };
    until!(h, "three idle members", {
        (members_in(MemberState::Idle).await.len() == 3).then_some(())
    });
    let idle: HashSet<String> = members_in(MemberState::Idle)
        .await
        .into_iter()
        .filter_map(|m| m.container_id)
        .collect();
    let chats = futures::future::join_all((0..6).map(|_| h.want(300))).await;
    let mut containers = HashSet::new();
    for &chat in &chats {
        let row = h.running(chat).await;
        let id = row.container_id.expect("a container");
        assert!(containers.insert(id.clone()), "{id} serves two chats");
    }
    // Each idle member was claimed; a refill member started meanwhile may have been too.
    let claimed = members_in(MemberState::Claimed).await;
    for id in &idle {
        assert!(
            claimed.iter().any(|m| m.container_id.as_ref() == Some(id)),
            "idle member {id} claimed: {claimed:?}"
        );
    }
    for m in &claimed {
        let id = m.container_id.clone().expect("a member's container");
        assert!(containers.contains(&id), "{id} serves a chat");
        let chat = m.chat_id.expect("claimed for a chat");
        let row = h.row(chat).await.expect("its row");
        assert_eq!(row.container_id.as_deref(), Some(id.as_str()));
        assert!(h.fake.signalled(&id), "{id} was told to go");
    }
    // The others started cold, each in a container of its own chat.
    let cold: Vec<ChatId> = chats
        .iter()
        .copied()
        .filter(|c| !claimed.iter().any(|m| m.chat_id == Some(*c)))
        .collect();
    assert_eq!(cold.len() + claimed.len(), chats.len());
    for chat in cold {
        let made = ours(&h.fake, chat);
        assert_eq!(made.len(), 1, "one cold container for {chat}");
        assert_eq!(made[0].pool_slot, None);
    }
    until!(h, "the pool refilled", {
        (members_in(MemberState::Idle).await.len() == 3).then_some(())
    });
    h.stop().await;
}

// ---- hibernation ---------------------------------------------------------------------

impl Harness {
    /// Declares the state of the chat's session, as the API does, and wakes the loop.
    async fn declare(&self, chat: ChatId, state: crate::domain::hibernation::SandboxState) {
        let row = self.row(chat).await.expect("row");
        self.store
            .declare_state(
                chat,
                row.session_id,
                state,
                crate::store::Declared::Client,
                chrono::Duration::seconds(300),
                chrono::Duration::days(7),
                Utc::now(),
            )
            .await
            .expect("declare")
            .expect("live");
        self.wake.notify_one();
    }

    async fn in_phase(&self, chat: ChatId, phase: Phase) -> SandboxRow {
        until!(self, phase.as_str(), {
            self.row(chat).await.filter(|r| r.phase == phase)
        })
    }
}

#[tokio::test]
async fn pause_hibernate_and_resume_keep_one_container_and_are_never_a_crash() {
    use crate::domain::hibernation::SandboxState;
    let h = Harness::start(|_| {}).await;
    let chat = h.want(300).await;
    let first = h.running(chat).await;
    let id = first.container_id.clone().unwrap();

    h.declare(chat, SandboxState::Paused).await;
    h.in_phase(chat, Phase::Paused).await;
    let c = ours(&h.fake, chat);
    assert!(c.len() == 1 && c[0].paused && c[0].id == id, "{c:?}");

    h.declare(chat, SandboxState::Hibernated).await;
    let hibernated = until!(h, "stopped", {
        h.row(chat)
            .await
            .filter(|r| r.phase == Phase::Hibernated && r.endpoint_ip.is_none())
    });
    assert_eq!(hibernated.container_id.as_deref(), Some(id.as_str()));
    let c = ours(&h.fake, chat);
    assert!(c.len() == 1 && !c[0].running && !c[0].paused, "{c:?}");
    // The stop's `die` event and later passes never count it as a crash.
    h.passes(3).await;
    let still = h.row(chat).await.unwrap();
    assert_eq!((still.phase, still.restarts), (Phase::Hibernated, 0));
    assert_eq!(h.fake.count("create"), 1, "nothing started anew");

    h.declare(chat, SandboxState::Running).await;
    let back = h.running(chat).await;
    assert_eq!(
        back.container_id.as_deref(),
        Some(id.as_str()),
        "same container"
    );
    assert_eq!((back.restarts, back.session_id), (0, first.session_id));
    let c = ours(&h.fake, chat);
    assert_eq!(
        (c.len(), c[0].starts),
        (1, 2),
        "started again in place: {c:?}"
    );
    assert_eq!(h.fake.count("create"), 1);
    h.stop().await;
}

#[tokio::test]
async fn idle_sandboxes_pause_then_hibernate_on_their_own_and_a_touch_wakes_them() {
    let h = Harness::start(|s| {
        s.sandbox.idle_pause_seconds = 1;
        s.sandbox.idle_hibernate_seconds = 2;
    })
    .await;
    let chat = h.want(300).await;
    let id = h.running(chat).await.container_id.unwrap();
    h.in_phase(chat, Phase::Paused).await;
    let row = h.in_phase(chat, Phase::Hibernated).await;
    assert_eq!(
        row.desired_state,
        crate::domain::hibernation::SandboxState::Running,
        "idleness is not a declaration"
    );
    // A touch no longer applies (it is asleep); a call declares it running, as `resume.rs`
    // does, which restarts the idle clock too.
    assert_eq!(
        h.store.touch(chat, Utc::now()).await.expect("touch"),
        crate::store::Touch::NotAwake
    );
    h.store
        .declare_state(
            chat,
            row.session_id,
            crate::domain::hibernation::SandboxState::Running,
            crate::store::Declared::Call("exec"),
            chrono::Duration::seconds(300),
            chrono::Duration::days(7),
            Utc::now(),
        )
        .await
        .expect("declare")
        .expect("live");
    h.wake.notify_one();
    let back = h.running(chat).await;
    assert_eq!(back.container_id.as_deref(), Some(id.as_str()));
    h.stop().await;
}

/// A resume slower than `idle_pause_seconds` (here 1.5 s against 1 s) must not leave the
/// sandbox idle the moment it runs: the idle clock starts when it runs again, so the call
/// that asked for it gets to it before any pause.
#[tokio::test]
async fn a_resume_slower_than_the_idle_pause_starts_the_idle_clock_when_it_runs() {
    use crate::domain::hibernation::SandboxState;
    let h = Harness::start(|s| {
        s.sandbox.idle_pause_seconds = 1;
        s.sandbox.idle_hibernate_seconds = 3600;
    })
    .await;
    let chat = h.want(300).await;
    h.running(chat).await;
    h.declare(chat, SandboxState::Hibernated).await;
    h.in_phase(chat, Phase::Hibernated).await;
    h.fake.slow_starts(Duration::from_millis(1500));
    let asked = Utc::now();
    h.declare(chat, SandboxState::Running).await;
    let back = h.running(chat).await;
    assert!(
        back.last_active_at >= asked + chrono::Duration::milliseconds(1400),
        "the clock restarted at {} for a resume asked at {asked}",
        back.last_active_at
    );
    h.stop().await;
}

#[tokio::test]
async fn a_resume_that_fails_falls_back_to_a_cold_start_of_the_same_session() {
    use crate::domain::hibernation::SandboxState;
    let h = Harness::start(|_| {}).await;
    let chat = h.want(300).await;
    let first = h.running(chat).await;
    h.declare(chat, SandboxState::Hibernated).await;
    h.in_phase(chat, Phase::Hibernated).await;
    h.fake.fail_starts(1);
    h.declare(chat, SandboxState::Running).await;
    let back = until!(h, "running in another container", {
        h.row(chat).await.filter(|r| {
            r.phase == Phase::Running
                && r.container_id.is_some()
                && r.container_id != first.container_id
        })
    });
    assert_eq!(back.session_id, first.session_id, "the same session");
    assert_eq!(ours(&h.fake, chat).len(), 1, "the failed container went");
    let events = h.store.events(Some(chat), 20).await.unwrap();
    assert!(
        events.iter().any(|e| e.action == "resume"
            && e.detail
                .as_deref()
                .unwrap_or("")
                .contains("resume_fallback")),
        "{events:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn on_expiry_hibernate_keeps_the_sandbox_for_the_retention_then_deletes_it() {
    let h = Harness::start(|s| {
        s.sandbox.on_expiry = crate::domain::hibernation::OnExpiry::Hibernate;
        s.sandbox.hibernated_retention_seconds = 2;
    })
    .await;
    let chat = h.want(1).await;
    let id = h.running(chat).await.container_id.unwrap();
    let asleep = until!(h, "stopped at expiry", {
        h.row(chat)
            .await
            .filter(|r| r.phase == Phase::Hibernated && r.endpoint_ip.is_none())
    });
    assert_eq!(
        asleep.container_id.as_deref(),
        Some(id.as_str()),
        "kept, not removed"
    );
    assert_eq!(
        asleep.desired_state,
        crate::domain::hibernation::SandboxState::Hibernated
    );
    assert!(asleep.expires_at > Utc::now(), "kept for the retention");
    h.in_phase(chat, Phase::Expired).await;
    assert!(
        ours(&h.fake, chat).is_empty(),
        "removed after the retention"
    );
    h.stop().await;
}

/// Past `network_capacity`, sandboxes go on further networks of the same settings, each
/// recorded in its row; the shards go when their last sandbox does, and a restart finds them.
#[tokio::test]
async fn a_full_network_spills_onto_shards_that_go_when_empty() {
    let fake = FakeBackend::new(INSTANCE);
    fake.add_network("sandbox", None);
    let h = Harness::start_on(fake, |s| s.sandbox.network_capacity = 2).await;
    let mut chats = Vec::new();
    for _ in 0..5 {
        chats.push(h.want(300).await);
    }
    let mut networks = Vec::new();
    for chat in &chats {
        let row = h.running(*chat).await;
        networks.push(row.network.clone().expect("the row names its network"));
    }
    networks.sort();
    assert_eq!(
        networks,
        ["sandbox", "sandbox", "sandbox-1", "sandbox-1", "sandbox-2"]
    );
    let per = h.fake.containers_per_network();
    assert_eq!(per.values().copied().max(), Some(2), "{per:?}");
    assert_eq!(
        h.fake.network_names(),
        ["sandbox", "sandbox-1", "sandbox-2"]
    );
    for chat in &chats {
        h.store
            .request_delete(*chat, Utc::now())
            .await
            .expect("delete");
    }
    h.wake.notify_one();
    until!(h, "every sandbox and shard gone", {
        (h.fake.containers().is_empty() && h.fake.network_names() == ["sandbox"]).then_some(())
    });
    h.stop().await;
}
