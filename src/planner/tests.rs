use super::*;
use chrono::Duration;
use proptest::prelude::*;
use uuid::Uuid;

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-24T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn chat(n: u8) -> ChatId {
    ChatId(Uuid::from_bytes([n; 16]))
}

fn session(n: u8) -> SessionId {
    SessionId(Uuid::from_bytes([n.wrapping_add(100); 16]))
}

fn row(n: u8) -> Desired {
    Desired {
        chat_id: chat(n),
        session_id: session(n),
        spec_hash: "h".into(),
        expires_at: t0() + Duration::seconds(300),
        deleted: false,
        phase: Phase::Pending,
        container_id: None,
        endpoint_ip: None,
        next_attempt_at: None,
        state: SandboxState::Running,
        state_changes_at: None,
        hibernate_at_expiry: false,
    }
}

fn running_row(n: u8) -> Desired {
    Desired {
        phase: Phase::Running,
        container_id: Some(format!("c{n}")),
        endpoint_ip: Some(format!("10.0.0.{n}")),
        ..row(n)
    }
}

fn container(n: u8) -> Observed {
    Observed {
        container_id: format!("c{n}"),
        chat_id: Some(chat(n)),
        session_id: Some(session(n)),
        spec_hash: Some("h".into()),
        running: true,
        paused: false,
        ip: Some(format!("10.0.0.{n}")),
        legacy: false,
        pool_slot: None,
        network: None,
    }
}

#[test]
fn converged_world_needs_nothing_and_wakes_at_expiry() {
    let p = plan(&[running_row(1)], &[container(1)], t0());
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert_eq!(p.next_wake, Some(t0() + Duration::seconds(300)));
}

#[test]
fn missing_container_is_started() {
    let p = plan(&[row(1)], &[], t0());
    assert_eq!(
        p.actions,
        vec![Action::Start {
            chat_id: chat(1),
            session_id: session(1),
            stale: vec![]
        }]
    );
    // A running row whose container vanished is recreated for the same session.
    let p = plan(&[running_row(1)], &[], t0());
    assert!(
        matches!(&p.actions[..], [Action::Start { session_id, .. }] if *session_id == session(1))
    );
}

#[test]
fn healthy_container_after_restart_is_adopted_not_restarted() {
    let p = plan(&[row(1)], &[container(1)], t0());
    assert_eq!(
        p.actions,
        vec![Action::Adopt {
            chat_id: chat(1),
            session_id: session(1),
            container_id: "c1".into(),
            ip: "10.0.0.1".into(),
            stale: vec![]
        }]
    );
}

#[test]
fn dead_or_drifted_container_is_replaced() {
    let dead = Observed {
        running: false,
        paused: false,
        ..container(1)
    };
    let p = plan(&[running_row(1)], &[dead], t0());
    assert!(
        matches!(&p.actions[..], [Action::Start { stale, .. }] if stale == &vec!["c1".to_string()])
    );

    let drifted = Observed {
        spec_hash: Some("other".into()),
        ..container(1)
    };
    let p = plan(&[running_row(1)], &[drifted], t0());
    assert!(
        matches!(&p.actions[..], [Action::Start { stale, .. }] if stale == &vec!["c1".to_string()])
    );

    let old_session = Observed {
        session_id: Some(session(9)),
        ..container(1)
    };
    let p = plan(&[running_row(1)], &[old_session], t0());
    assert!(matches!(&p.actions[..], [Action::Start { stale, .. }] if stale.len() == 1));
}

#[test]
fn duplicates_keep_the_recorded_one() {
    let dup = Observed {
        container_id: "c0".into(),
        ..container(1)
    };
    let p = plan(&[running_row(1)], &[container(1), dup], t0());
    assert_eq!(
        p.actions,
        vec![Action::Remove {
            key: Key::Chat(chat(1)),
            containers: vec!["c0".into()],
            reason: RemoveReason::Stale
        }]
    );
}

#[test]
fn expired_sessions_are_removed_and_recorded_once() {
    let mut r = running_row(1);
    r.expires_at = t0();
    let p = plan(&[r.clone()], &[container(1)], t0());
    assert_eq!(
        p.actions,
        vec![Action::Remove {
            key: Key::Chat(chat(1)),
            containers: vec!["c1".into()],
            reason: RemoveReason::Expire {
                session_id: session(1)
            }
        }]
    );
    r.phase = Phase::Expired;
    assert!(plan(&[r], &[], t0()).actions.is_empty());
}

#[test]
fn an_expired_phase_is_final_even_if_expires_at_moved_forward() {
    let mut r = row(1);
    r.phase = Phase::Expired;
    r.expires_at = t0() + Duration::seconds(600);
    assert!(
        plan(&[r.clone()], &[], t0()).actions.is_empty(),
        "no start loop"
    );
    let p = plan(&[r], &[container(1)], t0());
    assert!(matches!(
        &p.actions[..],
        [Action::Remove {
            reason: RemoveReason::Expire { .. },
            ..
        }]
    ));
}

#[test]
fn deleted_rows_are_finalized_even_without_containers() {
    let mut r = running_row(1);
    r.deleted = true;
    let p = plan(&[r.clone()], &[container(1)], t0());
    assert!(
        matches!(&p.actions[..], [Action::Remove { containers, reason: RemoveReason::Finalize { .. }, .. }] if containers.len() == 1)
    );
    let p = plan(&[r], &[], t0());
    assert!(
        matches!(&p.actions[..], [Action::Remove { containers, reason: RemoveReason::Finalize { .. }, .. }] if containers.is_empty())
    );
}

#[test]
fn orphans_are_removed_including_unparsable_ones() {
    let garbage = Observed {
        chat_id: None,
        session_id: None,
        ..container(7)
    };
    let p = plan(&[], &[container(2), garbage], t0());
    assert_eq!(p.actions.len(), 2);
    assert!(p.actions.iter().all(|a| matches!(
        a,
        Action::Remove {
            reason: RemoveReason::Orphan,
            ..
        }
    )));
}

#[test]
fn backoff_is_respected_and_woken_for() {
    let mut r = row(1);
    r.phase = Phase::Failed;
    r.next_attempt_at = Some(t0() + Duration::seconds(5));
    let p = plan(&[r.clone()], &[], t0());
    assert!(p.actions.is_empty());
    assert_eq!(p.next_wake, Some(t0() + Duration::seconds(5)));
    let p = plan(&[r], &[], t0() + Duration::seconds(5));
    assert!(matches!(&p.actions[..], [Action::Start { .. }]));
}

// ---- property tests: a simulated world -------------------------------------------------

/// Applies a plan as if every action succeeded.
fn apply(desired: &mut Vec<Desired>, observed: &mut Vec<Observed>, p: &Plan, next_id: &mut u32) {
    for a in &p.actions {
        match a {
            Action::Start {
                chat_id,
                session_id,
                stale,
            } => {
                observed.retain(|c| !stale.contains(&c.container_id));
                let row = desired.iter_mut().find(|d| d.chat_id == *chat_id).unwrap();
                *next_id += 1;
                let id = format!("new{next_id}");
                let ip = format!("10.1.0.{next_id}");
                observed.push(Observed {
                    container_id: id.clone(),
                    chat_id: Some(*chat_id),
                    session_id: Some(*session_id),
                    spec_hash: Some(row.spec_hash.clone()),
                    running: true,
                    paused: false,
                    ip: Some(ip.clone()),
                    legacy: false,
                    pool_slot: None,
                    network: None,
                });
                row.phase = Phase::Running;
                row.container_id = Some(id);
                row.endpoint_ip = Some(ip);
                row.next_attempt_at = None;
            }
            Action::Adopt {
                chat_id,
                container_id,
                ip,
                stale,
                ..
            } => {
                observed.retain(|c| !stale.contains(&c.container_id));
                let row = desired.iter_mut().find(|d| d.chat_id == *chat_id).unwrap();
                row.phase = Phase::Running;
                row.container_id = Some(container_id.clone());
                row.endpoint_ip = Some(ip.clone());
            }
            Action::Transition {
                chat_id,
                container_id,
                to,
                stale,
                ..
            } => {
                observed.retain(|c| !stale.contains(&c.container_id));
                let row = desired.iter_mut().find(|d| d.chat_id == *chat_id).unwrap();
                let c = container_id
                    .as_ref()
                    .and_then(|id| observed.iter_mut().find(|c| c.container_id == *id));
                match (to, c) {
                    (SandboxState::Hibernated, c) => {
                        if let Some(c) = c {
                            c.running = false;
                            c.paused = false;
                            c.ip = None;
                        }
                        row.phase = Phase::Hibernated;
                        row.container_id = container_id.clone();
                        row.endpoint_ip = None;
                    }
                    (to, Some(c)) => {
                        let ip =
                            c.ip.clone()
                                .unwrap_or_else(|| format!("10.2.0.{}", *next_id));
                        *next_id += 1;
                        c.ip = Some(ip.clone());
                        c.running = *to == SandboxState::Running;
                        c.paused = *to == SandboxState::Paused;
                        row.phase = if c.running {
                            Phase::Running
                        } else {
                            Phase::Paused
                        };
                        row.container_id = Some(c.container_id.clone());
                        row.endpoint_ip = Some(ip);
                    }
                    (_, None) => unreachable!("a resume or pause always names its container"),
                }
            }
            Action::HibernateAtExpiry { chat_id, .. } => {
                let row = desired.iter_mut().find(|d| d.chat_id == *chat_id).unwrap();
                row.state = SandboxState::Hibernated;
                row.hibernate_at_expiry = false;
                row.expires_at = t0() + Duration::days(7);
            }
            Action::Remove {
                key,
                containers,
                reason,
            } => {
                observed.retain(|c| !containers.contains(&c.container_id));
                if let Key::Chat(chat_id) = key {
                    match reason {
                        RemoveReason::Expire { .. } => {
                            if let Some(r) = desired.iter_mut().find(|d| d.chat_id == *chat_id) {
                                r.phase = Phase::Expired;
                            }
                        }
                        RemoveReason::Finalize { .. } => desired.retain(|d| d.chat_id != *chat_id),
                        _ => {}
                    }
                }
            }
        }
    }
}

fn arb_world() -> impl Strategy<Value = (Vec<Desired>, Vec<Observed>)> {
    let rows = prop::collection::vec(
        (
            0u8..12,
            any::<bool>(),
            0i64..3,
            prop::sample::select(Phase::ALL.to_vec()),
            any::<bool>(),
            0i64..3,
            (
                prop::sample::select(SandboxState::ALL.to_vec()),
                any::<bool>(),
            ),
        ),
        0..10,
    )
    .prop_map(|v| {
        let mut seen = std::collections::HashSet::new();
        v.into_iter()
            .filter(|(n, ..)| seen.insert(*n))
            .map(
                |(n, deleted, exp, phase, has_c, backoff, (state, at_expiry))| Desired {
                    state,
                    hibernate_at_expiry: at_expiry && state != SandboxState::Hibernated,
                    deleted,
                    expires_at: t0() + Duration::seconds(exp * 100 - 50),
                    phase,
                    container_id: has_c.then(|| format!("c{n}")),
                    endpoint_ip: has_c.then(|| format!("10.0.0.{n}")),
                    next_attempt_at: (backoff > 0)
                        .then(|| t0() + Duration::seconds(backoff * 10 - 15)),
                    ..row(n)
                },
            )
            .collect::<Vec<_>>()
    });
    let containers = prop::collection::vec(
        (
            0u8..12,
            0u8..3,
            any::<bool>(),
            // running, paused or stopped
            prop::sample::select(vec![(true, false), (false, true), (false, false)]),
            any::<bool>(),
            any::<bool>(),
            0u8..4,
        ),
        0..14,
    )
    .prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(
                |(i, (n, sess, hash_ok, (running, paused), has_ip, parsable, suffix))| Observed {
                    container_id: if suffix == 0 {
                        format!("c{n}")
                    } else {
                        format!("x{i}")
                    },
                    chat_id: parsable.then(|| chat(n)),
                    session_id: Some(if sess == 0 {
                        session(n)
                    } else {
                        session(n.wrapping_add(sess * 20))
                    }),
                    spec_hash: Some(if hash_ok { "h".into() } else { "old".into() }),
                    running,
                    paused,
                    ip: has_ip.then(|| format!("10.0.0.{n}")),
                    legacy: false,
                    pool_slot: None,
                    network: None,
                },
            )
            .collect::<Vec<_>>()
    });
    (rows, containers).prop_map(|(r, mut c)| {
        let mut seen = std::collections::HashSet::new();
        c.retain(|o| seen.insert(o.container_id.clone()));
        (r, c)
    })
}

proptest! {
    #[test]
    fn plan_apply_plan_is_a_fixed_point((mut desired, mut observed) in arb_world()) {
        let now = t0();
        let first = plan(&desired, &observed, now);
        let mut next_id = 0;
        apply(&mut desired, &mut observed, &first, &mut next_id);
        let mut second = plan(&desired, &observed, now);
        // Two steps by design: hibernating at expiry is a desired-state write (its stop is
        // the next plan's), and a sandbox wanted paused without a container starts first.
        let paused_start = |a: &Action| match a {
            Action::Start { chat_id, .. } => desired
                .iter()
                .any(|d| d.chat_id == *chat_id && d.state == SandboxState::Paused),
            _ => false,
        };
        if first
            .actions
            .iter()
            .any(|a| matches!(a, Action::HibernateAtExpiry { .. }) || paused_start(a))
        {
            apply(&mut desired, &mut observed, &second, &mut next_id);
            second = plan(&desired, &observed, now);
        }
        prop_assert!(second.actions.is_empty(), "second plan: {:?}", second.actions);
    }

    #[test]
    fn at_most_one_action_per_key_and_no_container_in_two((desired, observed) in arb_world()) {
        let p = plan(&desired, &observed, t0());
        let mut keys = std::collections::HashSet::new();
        let mut touched = std::collections::HashSet::new();
        for a in &p.actions {
            prop_assert!(keys.insert(a.key()));
            let ids: Vec<&String> = match a {
                Action::Start { stale, .. } => stale.iter().collect(),
                Action::Adopt { stale, container_id, .. } => stale.iter().chain([container_id]).collect(),
                Action::Remove { containers, .. } => containers.iter().collect(),
                Action::Transition { stale, container_id, .. } => {
                    stale.iter().chain(container_id.iter()).collect()
                }
                Action::HibernateAtExpiry { .. } => Vec::new(),
            };
            for id in ids {
                prop_assert!(touched.insert(id.clone()), "container {id} in two actions");
            }
        }
    }

    #[test]
    fn converged_world_yields_nothing(n in 0usize..12) {
        let rows: Vec<Desired> = (0..n as u8).map(running_row).collect();
        let cs: Vec<Observed> = (0..n as u8).map(container).collect();
        prop_assert!(plan(&rows, &cs, t0()).actions.is_empty());
    }
}

#[test]
fn an_action_in_flight_settles_the_same_goal_but_not_a_new_one() {
    let start = |session: u8, stale: &[&str]| Action::Start {
        chat_id: chat(1),
        session_id: super::tests::session(session),
        stale: stale.iter().map(|s| s.to_string()).collect(),
    };
    let adopt = |session: u8| Action::Adopt {
        chat_id: chat(1),
        session_id: super::tests::session(session),
        container_id: "new".into(),
        ip: "10.0.0.2".into(),
        stale: vec![],
    };
    let remove = |containers: &[&str]| Action::Remove {
        key: Key::Chat(chat(1)),
        containers: containers.iter().map(|s| s.to_string()).collect(),
        reason: RemoveReason::Stale,
    };
    // Mid-start the planner sees the new container and says "adopt": same goal.
    assert!(start(1, &[]).settles(&adopt(1)));
    assert!(start(1, &["old"]).settles(&start(1, &["old"])));
    // A new session, or a stale container the running start does not remove: a new goal.
    assert!(!start(1, &[]).settles(&start(2, &[])));
    assert!(!start(1, &[]).settles(&start(1, &["old"])));
    assert!(!start(1, &[]).settles(&remove(&["x"])));
    assert!(remove(&["x", "y"]).settles(&remove(&["y"])));
    assert!(!remove(&["x"]).settles(&remove(&["x", "y"])));
    assert!(!remove(&["x"]).settles(&start(1, &[])));
}

#[test]
fn an_adopted_old_service_container_is_kept_despite_its_spec_until_it_stops() {
    // The old service's containers carry no spec hash: never replaced for drift.
    let legacy = Observed {
        spec_hash: None,
        legacy: true,
        pool_slot: None,
        network: None,
        ..container(1)
    };
    let p = plan(&[running_row(1)], std::slice::from_ref(&legacy), t0());
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    // The same container without the legacy mark is drift.
    let drifted = Observed {
        spec_hash: None,
        ..container(1)
    };
    assert!(matches!(
        plan(&[running_row(1)], &[drifted], t0()).actions[..],
        [Action::Start { .. }]
    ));
    // Stopped: replaced by a container of sandboxd's own, for the same session.
    let stopped = Observed {
        running: false,
        paused: false,
        ..legacy.clone()
    };
    match &plan(&[running_row(1)], &[stopped], t0()).actions[..] {
        [Action::Start {
            session_id, stale, ..
        }] => {
            assert_eq!(*session_id, session(1));
            assert_eq!(stale, &vec!["c1".to_string()]);
        }
        other => panic!("{other:?}"),
    }
    // Expired: removed like any other.
    let later = t0() + Duration::seconds(301);
    assert!(matches!(
        plan(&[running_row(1)], &[legacy], later).actions[..],
        [Action::Remove {
            reason: RemoveReason::Expire { .. },
            ..
        }]
    ));
}

// ---- hibernation ---------------------------------------------------------------------

fn wanting(n: u8, state: SandboxState) -> Desired {
    Desired {
        state,
        ..running_row(n)
    }
}

fn paused(n: u8) -> Observed {
    Observed {
        running: false,
        paused: true,
        ..container(n)
    }
}

fn stopped(n: u8) -> Observed {
    Observed {
        running: false,
        paused: false,
        ip: None,
        ..container(n)
    }
}

fn transition(p: &Plan) -> (Option<String>, Found, SandboxState, Vec<String>) {
    match &p.actions[..] {
        [Action::Transition {
            container_id,
            found,
            to,
            stale,
            ..
        }] => (container_id.clone(), *found, *to, stale.clone()),
        other => panic!("expected one transition, got {other:?}"),
    }
}

#[test]
fn a_running_sandbox_wanted_paused_or_hibernated_is_frozen_or_stopped_in_place() {
    let p = plan(&[wanting(1, SandboxState::Paused)], &[container(1)], t0());
    assert_eq!(
        transition(&p),
        (
            Some("c1".into()),
            Found::Running,
            SandboxState::Paused,
            vec![]
        )
    );
    assert_eq!(p.actions[0].kind(), "pause");
    let p = plan(&[wanting(1, SandboxState::Hibernated)], &[paused(1)], t0());
    assert_eq!(
        transition(&p),
        (
            Some("c1".into()),
            Found::Paused,
            SandboxState::Hibernated,
            vec![]
        )
    );
    assert_eq!(p.actions[0].kind(), "hibernate");
}

#[test]
fn settled_states_need_nothing() {
    let r = Desired {
        phase: Phase::Paused,
        ..wanting(1, SandboxState::Paused)
    };
    assert!(plan(&[r], &[paused(1)], t0()).actions.is_empty());
    let r = Desired {
        phase: Phase::Hibernated,
        endpoint_ip: None,
        ..wanting(1, SandboxState::Hibernated)
    };
    assert!(plan(&[r], &[stopped(1)], t0()).actions.is_empty());
}

#[test]
fn a_container_found_paused_or_stopped_by_sandboxd_is_resumed_never_replaced() {
    // Paused (by sandboxd or by hand) and wanted running: thawed.
    let p = plan(&[running_row(1)], &[paused(1)], t0());
    assert_eq!(
        transition(&p),
        (
            Some("c1".into()),
            Found::Paused,
            SandboxState::Running,
            vec![]
        )
    );
    assert_eq!(p.actions[0].kind(), "resume");
    // Stopped while the phase says hibernated: started again in place.
    let r = Desired {
        phase: Phase::Hibernated,
        endpoint_ip: None,
        ..running_row(1)
    };
    let p = plan(&[r], &[stopped(1)], t0());
    assert_eq!(
        transition(&p),
        (
            Some("c1".into()),
            Found::Stopped,
            SandboxState::Running,
            vec![]
        )
    );
}

#[test]
fn a_container_that_stopped_on_its_own_is_a_crash_not_a_hibernation() {
    let p = plan(&[running_row(1)], &[stopped(1)], t0());
    assert_eq!(
        p.actions,
        vec![Action::Start {
            chat_id: chat(1),
            session_id: session(1),
            stale: vec!["c1".into()],
        }]
    );
}

#[test]
fn a_stop_interrupted_by_a_crash_of_sandboxd_is_recorded_not_repeated() {
    // Wanted running again meanwhile: the stopped container is sandboxd's, resumed in place.
    let r = Desired {
        phase: Phase::Hibernating,
        ..running_row(1)
    };
    let p = plan(&[r], &[stopped(1)], t0());
    assert_eq!(transition(&p).1, Found::Stopped);
    assert_eq!(p.actions[0].kind(), "resume");
    // The phase was written, the container stopped, the record never made.
    let r = Desired {
        phase: Phase::Hibernating,
        ..wanting(1, SandboxState::Hibernated)
    };
    let p = plan(&[r], &[stopped(1)], t0());
    assert_eq!(
        transition(&p),
        (
            Some("c1".into()),
            Found::Stopped,
            SandboxState::Hibernated,
            vec![]
        )
    );
    assert_eq!(p.actions[0].kind(), "record_state");
    // Written, stop never sent: stopped now.
    let r = Desired {
        phase: Phase::Hibernating,
        ..wanting(1, SandboxState::Hibernated)
    };
    let p = plan(&[r], &[container(1)], t0());
    assert_eq!(transition(&p).1, Found::Running);
}

#[test]
fn hibernated_without_a_container_is_recorded_and_a_resume_starts_cold() {
    let p = plan(&[wanting(1, SandboxState::Hibernated)], &[], t0());
    assert_eq!(
        transition(&p),
        (None, Found::Missing, SandboxState::Hibernated, vec![])
    );
    let r = Desired {
        phase: Phase::Hibernated,
        container_id: None,
        endpoint_ip: None,
        ..running_row(1)
    };
    let p = plan(&[r], &[], t0());
    assert!(matches!(&p.actions[..], [Action::Start { .. }]));
}

#[test]
fn other_sessions_containers_go_beside_a_transition() {
    let mut old = container(1);
    old.container_id = "old".into();
    old.session_id = Some(session(9));
    let p = plan(
        &[wanting(1, SandboxState::Paused)],
        &[container(1), old],
        t0(),
    );
    assert_eq!(transition(&p).3, vec!["old".to_string()]);
}

#[test]
fn the_idle_timer_and_expiry_under_hibernation_are_deadlines() {
    let r = Desired {
        state_changes_at: Some(t0() + Duration::seconds(30)),
        ..running_row(1)
    };
    let p = plan(&[r], &[container(1)], t0());
    assert!(p.actions.is_empty());
    assert_eq!(p.next_wake, Some(t0() + Duration::seconds(30)));
    // Past the TTL with `on_expiry: hibernate`: declared hibernated, nothing removed.
    let r = Desired {
        hibernate_at_expiry: true,
        ..running_row(1)
    };
    let p = plan(&[r], &[container(1)], t0() + Duration::seconds(300));
    assert_eq!(
        p.actions,
        vec![Action::HibernateAtExpiry {
            chat_id: chat(1),
            session_id: session(1)
        }]
    );
    // Past the retention of a hibernated one: removed as expired.
    let r = Desired {
        phase: Phase::Hibernated,
        endpoint_ip: None,
        ..wanting(1, SandboxState::Hibernated)
    };
    let p = plan(&[r], &[stopped(1)], t0() + Duration::seconds(300));
    assert!(matches!(
        &p.actions[..],
        [Action::Remove {
            reason: RemoveReason::Expire { .. },
            ..
        }]
    ));
}
