//! The pure heart of sandboxd: `plan(desired, observed, now)` decides every action.
//!
//! No I/O, no clocks, no randomness: given the rows in the store, the containers Docker reports
//! for this instance and the time, it returns what to do and when to look again. Everything the
//! controller does is one of these actions, so the decisions are all tested here.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::domain::hibernation::SandboxState;
use crate::domain::{ChatId, Phase, SessionId};

/// What the store says one chat should be (and what was last recorded about it).
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub chat_id: ChatId,
    pub session_id: SessionId,
    pub spec_hash: String,
    pub expires_at: DateTime<Utc>,
    /// Deletion was requested: remove the containers, then the row (finalizer order).
    pub deleted: bool,
    pub phase: Phase,
    pub container_id: Option<String>,
    pub endpoint_ip: Option<String>,
    /// Set after a failure: do not retry before this time.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// What the sandbox should be now: its declared state, or further along when idle.
    pub state: SandboxState,
    /// When `state` changes on its own (the next idle step).
    pub state_changes_at: Option<DateTime<Utc>>,
    /// `sandbox.on_expiry: hibernate` and not hibernated yet: the TTL ends in hibernation.
    pub hibernate_at_expiry: bool,
}

/// One container carrying this instance's labels, as Docker reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub container_id: String,
    /// `None` when the labels cannot be parsed: such a container is an orphan.
    pub chat_id: Option<ChatId>,
    pub session_id: Option<SessionId>,
    pub spec_hash: Option<String>,
    pub running: bool,
    /// Frozen by the engine's pause (then `running` is false).
    pub paused: bool,
    /// The container's address on its network, if it has one.
    pub ip: Option<String>,
    /// The network it was created on (sandbox networks fill up: `controller/networks.rs`).
    pub network: Option<String>,
    /// Started by the old Python service and adopted at takeover: it has no spec hash, and is
    /// never replaced for drift (only when it stops running).
    pub legacy: bool,
    /// A warm-pool member (`pool/`): the pool owns it until it is claimed, and the controller
    /// fills in the chat, session and spec of a claimed one from the store before planning.
    pub pool_slot: Option<String>,
}

/// Why containers are removed; decides what is recorded afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoveReason {
    /// Labelled for this instance but no row wants it.
    Orphan,
    /// Superseded, drifted or duplicate containers of a chat that is otherwise converged.
    Stale,
    /// The session's TTL passed: record phase `expired`, keep the row.
    Expire { session_id: SessionId },
    /// Deletion was requested: delete the row once its containers are gone.
    Finalize { session_id: SessionId },
}

/// The unit of mutual exclusion: never two actions for one key at once.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    Chat(ChatId),
    /// An unparsable orphan has no chat; its container id stands in.
    Container(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Remove `stale`, then create and start a container for the session.
    Start {
        chat_id: ChatId,
        session_id: SessionId,
        stale: Vec<String>,
    },
    /// A healthy container for the session exists (e.g. after a restart): record it, never
    /// restart it; remove `stale`.
    Adopt {
        chat_id: ChatId,
        session_id: SessionId,
        container_id: String,
        ip: String,
        stale: Vec<String>,
    },
    Remove {
        key: Key,
        containers: Vec<String>,
        reason: RemoveReason,
    },
    /// Bring the session's container from `found` to `to` (pause, unpause, stop, start it
    /// again) and record it; `found == to` only records what the engine already shows.
    Transition {
        chat_id: ChatId,
        session_id: SessionId,
        container_id: Option<String>,
        found: Found,
        to: SandboxState,
        stale: Vec<String>,
    },
    /// The TTL passed under `sandbox.on_expiry: hibernate`: declare the sandbox hibernated
    /// (for `sandbox.hibernated_retention_seconds`); the next pass stops it.
    HibernateAtExpiry {
        chat_id: ChatId,
        session_id: SessionId,
    },
}

/// How the session's own container was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    Running,
    Paused,
    /// Exists but does not run: hibernated by sandboxd.
    Stopped,
    /// No container.
    Missing,
}

impl Found {
    /// The state a container found so already is in, if any.
    fn as_state(self) -> Option<SandboxState> {
        match self {
            Found::Running => Some(SandboxState::Running),
            Found::Paused => Some(SandboxState::Paused),
            Found::Stopped | Found::Missing => Some(SandboxState::Hibernated),
        }
    }
}

impl Action {
    pub fn key(&self) -> Key {
        match self {
            Action::Start { chat_id, .. }
            | Action::Adopt { chat_id, .. }
            | Action::Transition { chat_id, .. }
            | Action::HibernateAtExpiry { chat_id, .. } => Key::Chat(*chat_id),
            Action::Remove { key, .. } => key.clone(),
        }
    }

    /// Whether finishing `self`, already in flight, also settles `next`, a later plan's action
    /// for the same key: a start or adopt of the same session settles another (mid-start the
    /// planner may see the new container and say "adopt"), unless `next` found stale
    /// containers `self` does not remove; a removal settles one of fewer containers.
    pub fn settles(&self, next: &Action) -> bool {
        let covers = |ours: &[String], theirs: &[String]| theirs.iter().all(|c| ours.contains(c));
        match (self, next) {
            (
                Action::Start {
                    session_id: a,
                    stale: ours,
                    ..
                }
                | Action::Adopt {
                    session_id: a,
                    stale: ours,
                    ..
                },
                Action::Start {
                    session_id: b,
                    stale: theirs,
                    ..
                }
                | Action::Adopt {
                    session_id: b,
                    stale: theirs,
                    ..
                },
            ) => a == b && covers(ours, theirs),
            (
                Action::Remove {
                    containers: ours, ..
                },
                Action::Remove {
                    containers: theirs, ..
                },
            ) => covers(ours, theirs),
            (
                Action::Transition {
                    session_id: a,
                    to: x,
                    stale: ours,
                    ..
                },
                Action::Transition {
                    session_id: b,
                    to: y,
                    stale: theirs,
                    ..
                },
            ) => a == b && x == y && covers(ours, theirs),
            (
                Action::HibernateAtExpiry { session_id: a, .. },
                Action::HibernateAtExpiry { session_id: b, .. },
            ) => a == b,
            _ => false,
        }
    }

    /// A short name for logs, events and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Start { .. } => "start",
            Action::Adopt { .. } => "adopt",
            Action::Remove { reason, .. } => match reason {
                RemoveReason::Orphan => "remove_orphan",
                RemoveReason::Stale => "remove_stale",
                RemoveReason::Expire { .. } => "expire",
                RemoveReason::Finalize { .. } => "finalize",
            },
            Action::Transition { found, to, .. } => match (found.as_state(), to) {
                (Some(a), b) if a == *b => "record_state",
                (_, SandboxState::Running) => "resume",
                (_, SandboxState::Paused) => "pause",
                (_, SandboxState::Hibernated) => "hibernate",
            },
            Action::HibernateAtExpiry { .. } => "hibernate_at_expiry",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// The earliest future time at which the plan would change on its own (an expiry or a
    /// backoff deadline); the controller wakes then even if nothing else happens.
    pub next_wake: Option<DateTime<Utc>>,
}

/// Decides what to do. Actions come out ordered by key, at most one per key.
pub fn plan(desired: &[Desired], observed: &[Observed], now: DateTime<Utc>) -> Plan {
    // Hash-grouped for speed (this runs on every pass over every sandbox); determinism comes
    // from sorting each chat's containers and the final actions.
    let mut by_chat: HashMap<ChatId, Vec<&Observed>> = HashMap::with_capacity(observed.len());
    let mut unparsable: Vec<&Observed> = Vec::new();
    for c in observed {
        match c.chat_id {
            Some(chat) => by_chat.entry(chat).or_default().push(c),
            None => unparsable.push(c),
        }
    }
    for list in by_chat.values_mut().filter(|l| l.len() > 1) {
        list.sort_by(|a, b| a.container_id.cmp(&b.container_id));
    }

    let mut out = Plan::default();
    let wake = |t: DateTime<Utc>, out: &mut Plan| {
        if t > now && out.next_wake.is_none_or(|w| t < w) {
            out.next_wake = Some(t);
        }
    };

    for row in desired {
        let containers = by_chat.remove(&row.chat_id).unwrap_or_default();
        let ids = |cs: &[&Observed]| cs.iter().map(|c| c.container_id.clone()).collect();

        if row.deleted {
            out.actions.push(Action::Remove {
                key: Key::Chat(row.chat_id),
                containers: ids(&containers),
                reason: RemoveReason::Finalize {
                    session_id: row.session_id,
                },
            });
            continue;
        }

        // An `expired` phase is final for its session, even if a clock step or a late renew
        // moved `expires_at` forward again: the session never comes back.
        if now >= row.expires_at && row.hibernate_at_expiry && row.phase != Phase::Expired {
            out.actions.push(Action::HibernateAtExpiry {
                chat_id: row.chat_id,
                session_id: row.session_id,
            });
            continue;
        }
        if now >= row.expires_at || row.phase == Phase::Expired {
            if !containers.is_empty() || row.phase != Phase::Expired {
                out.actions.push(Action::Remove {
                    key: Key::Chat(row.chat_id),
                    containers: ids(&containers),
                    reason: RemoveReason::Expire {
                        session_id: row.session_id,
                    },
                });
            }
            continue;
        }
        wake(row.expires_at, &mut out);
        if let Some(t) = row.state_changes_at {
            wake(t, &mut out);
        }
        if let Some(action) = plan_live(row, &containers, now, &mut out) {
            out.actions.push(action);
        }
    }

    // Whatever is left has no row: orphans.
    for (chat, containers) in by_chat {
        out.actions.push(Action::Remove {
            key: Key::Chat(chat),
            containers: containers.iter().map(|c| c.container_id.clone()).collect(),
            reason: RemoveReason::Orphan,
        });
    }
    for c in unparsable {
        out.actions.push(Action::Remove {
            key: Key::Container(c.container_id.clone()),
            containers: vec![c.container_id.clone()],
            reason: RemoveReason::Orphan,
        });
    }
    out.actions.sort_by_key(Action::key);
    out
}

/// The action for a live row: bring its containers to the row's (effective) state.
fn plan_live(
    row: &Desired,
    containers: &[&Observed],
    now: DateTime<Utc>,
    out: &mut Plan,
) -> Option<Action> {
    let ours = |c: &Observed| {
        c.session_id == Some(row.session_id)
            && (c.legacy || c.spec_hash.as_deref() == Some(row.spec_hash.as_str()))
    };
    let healthy = |c: &Observed| ours(c) && c.running && c.ip.is_some();
    // Prefer the container the row already points at; otherwise the lowest id.
    let pick = |fits: &dyn Fn(&Observed) -> bool| {
        containers
            .iter()
            .filter(|c| fits(c))
            .find(|c| row.container_id.as_deref() == Some(c.container_id.as_str()))
            .or_else(|| containers.iter().find(|c| fits(c)))
            .copied()
    };
    // A stopped container is kept and started again in place when sandboxd stopped it (the
    // phase is written before the stop), when it was frozen (a paused container does not
    // exit on its own: the engine restarted under it), or when hibernation is wanted anyway;
    // otherwise it exited on its own: a crash, restarted by `Start` with crash-loop pacing.
    let hibernated = matches!(
        row.phase,
        Phase::Hibernating | Phase::Hibernated | Phase::Pausing | Phase::Paused
    ) || row.state == SandboxState::Hibernated;
    let keep = pick(&healthy)
        .map(|c| (c, Found::Running))
        .or_else(|| pick(&|c| ours(c) && c.paused).map(|c| (c, Found::Paused)))
        .or_else(|| {
            pick(&|c| ours(c) && hibernated && !c.running && !c.paused).map(|c| (c, Found::Stopped))
        });
    let stale = |keep: Option<&Observed>| -> Vec<String> {
        containers
            .iter()
            .filter(|c| keep.is_none_or(|k| k.container_id != c.container_id))
            .map(|c| c.container_id.clone())
            .collect()
    };
    let remove_stale = |stale: Vec<String>| {
        (!stale.is_empty()).then_some(Action::Remove {
            key: Key::Chat(row.chat_id),
            containers: stale,
            reason: RemoveReason::Stale,
        })
    };
    let transition = |c: Option<&Observed>, found: Found, to: SandboxState| Action::Transition {
        chat_id: row.chat_id,
        session_id: row.session_id,
        container_id: c.map(|c| c.container_id.clone()),
        found,
        to,
        stale: stale(c),
    };
    let recorded = |c: &Observed, phase: Phase| {
        row.phase == phase && row.container_id.as_deref() == Some(c.container_id.as_str())
    };

    match (row.state, keep) {
        (SandboxState::Running, Some((k, Found::Running))) => {
            let ip = k.ip.clone().unwrap_or_default();
            let recorded =
                recorded(k, Phase::Running) && row.endpoint_ip.as_deref() == Some(ip.as_str());
            if recorded {
                remove_stale(stale(Some(k)))
            } else {
                Some(Action::Adopt {
                    chat_id: row.chat_id,
                    session_id: row.session_id,
                    container_id: k.container_id.clone(),
                    ip,
                    stale: stale(Some(k)),
                })
            }
        }
        // Frozen or stopped by sandboxd, wanted running: resumed in place, never replaced.
        (SandboxState::Running, Some((k, found))) => {
            Some(transition(Some(k), found, SandboxState::Running))
        }
        (SandboxState::Paused, Some((k, Found::Paused))) if recorded(k, Phase::Paused) => {
            remove_stale(stale(Some(k)))
        }
        (SandboxState::Paused, Some((k, found))) => {
            Some(transition(Some(k), found, SandboxState::Paused))
        }
        (SandboxState::Hibernated, Some((k, Found::Stopped))) if recorded(k, Phase::Hibernated) => {
            remove_stale(stale(Some(k)))
        }
        (SandboxState::Hibernated, Some((k, found))) => {
            Some(transition(Some(k), found, SandboxState::Hibernated))
        }
        // Hibernated and nothing to keep: there is nothing to stop; a resume starts cold.
        (SandboxState::Hibernated, None) => {
            if row.phase == Phase::Hibernated && row.container_id.is_none() {
                remove_stale(stale(None))
            } else {
                Some(transition(None, Found::Missing, SandboxState::Hibernated))
            }
        }
        // Running or paused wanted, nothing to keep: start (a paused one is paused after).
        (_, None) => match row.next_attempt_at {
            Some(t) if t > now => {
                if out.next_wake.is_none_or(|w| t < w) {
                    out.next_wake = Some(t);
                }
                remove_stale(stale(None))
            }
            _ => Some(Action::Start {
                chat_id: row.chat_id,
                session_id: row.session_id,
                stale: stale(None),
            }),
        },
    }
}

#[cfg(test)]
mod tests;
