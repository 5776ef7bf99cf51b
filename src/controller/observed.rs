//! The controller's picture of the engine between lists, after kube-runtime's reflector.
//!
//! A pass needs every container of this instance. Listing them costs an engine round trip on
//! every pass, and most passes follow sandboxd's own writes (a create's new row), which the
//! list could not have changed. So the full list is taken only when the engine may have
//! changed on its own: at connect, at every resync, after a failed pass, and after an engine
//! event (or the old service's takeover). In between, the executor writes what it did (a
//! container started, containers removed) into this copy, and passes plan from it.
//! Correctness never depends on it: a resync relists whatever happened.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::planner::Observed;

/// What the executor did, replayed over a list that was under way meanwhile.
#[derive(Clone)]
enum Change {
    Started(Observed),
    Removed(String),
}

#[derive(Default)]
struct Inner {
    /// The containers, or `None` when a list is needed.
    by_id: Option<HashMap<String, Observed>>,
    /// Changes made while a list is under way: the list may predate them (a container it
    /// saw created but not yet started, or one removed since), so they win over it.
    during_list: Option<Vec<Change>>,
}

#[derive(Default)]
pub(super) struct ObservedCache(Mutex<Inner>);

impl ObservedCache {
    /// The containers as last seen, or `None` when a list is needed.
    pub(super) fn snapshot(&self) -> Option<Vec<Observed>> {
        let mut all: Vec<Observed> = self.lock().by_id.as_ref()?.values().cloned().collect();
        // The planner sorts what it needs; a stable order keeps logs comparable.
        all.sort_by(|a, b| a.container_id.cmp(&b.container_id));
        Some(all)
    }

    /// A list from the engine is about to be taken.
    pub(super) fn listing(&self) {
        let mut inner = self.lock();
        inner.by_id = None;
        inner.during_list = Some(Vec::new());
    }

    /// The list from the engine, with what the executor did since it began. A list during
    /// which the copy was invalidated is not kept: the next pass lists again.
    pub(super) fn replace(&self, listed: &[Observed]) {
        let mut inner = self.lock();
        let Some(changes) = inner.during_list.take() else {
            return;
        };
        let mut by_id: HashMap<String, Observed> = listed
            .iter()
            .map(|o| (o.container_id.clone(), o.clone()))
            .collect();
        for change in changes {
            apply(&mut by_id, change);
        }
        inner.by_id = Some(by_id);
    }

    /// The engine may have changed on its own: the next pass lists.
    pub(super) fn invalidate(&self) {
        let mut inner = self.lock();
        inner.by_id = None;
        inner.during_list = None;
    }

    /// sandboxd started (or adopted) this container.
    pub(super) fn started(&self, o: Observed) {
        self.record(Change::Started(o));
    }

    /// sandboxd removed these containers.
    pub(super) fn removed(&self, ids: &[String]) {
        for id in ids {
            self.record(Change::Removed(id.clone()));
        }
    }

    fn record(&self, change: Change) {
        let mut inner = self.lock();
        if let Some(log) = inner.during_list.as_mut() {
            log.push(change.clone());
        }
        if let Some(by_id) = inner.by_id.as_mut() {
            apply(by_id, change);
        }
    }

    // Each change is made under the lock in one go: a panic elsewhere cannot leave it
    // half-done.
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn apply(by_id: &mut HashMap<String, Observed>, change: Change) {
    match change {
        Change::Started(o) => {
            by_id.insert(o.container_id.clone(), o);
        }
        Change::Removed(id) => {
            by_id.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(id: &str) -> Observed {
        Observed {
            container_id: id.into(),
            chat_id: None,
            session_id: None,
            spec_hash: None,
            running: true,
            paused: false,
            ip: None,
            legacy: false,
            pool_slot: None,
            network: None,
        }
    }

    #[test]
    fn own_changes_are_kept_until_the_engine_may_have_changed() {
        let cache = ObservedCache::default();
        assert_eq!(cache.snapshot(), None, "nothing listed yet");
        cache.started(o("ignored")); // not listed yet: nothing to add to
        assert_eq!(cache.snapshot(), None);
        cache.listing();
        cache.invalidate();
        cache.replace(&[o("a")]);
        assert_eq!(
            cache.snapshot(),
            None,
            "invalidated while listing: list again"
        );
        cache.listing();
        cache.replace(&[o("a"), o("b")]);
        cache.started(o("c"));
        cache.removed(&["a".into()]);
        let ids: Vec<_> = cache
            .snapshot()
            .unwrap()
            .into_iter()
            .map(|o| o.container_id)
            .collect();
        assert_eq!(ids, ["b", "c"]);
        cache.invalidate();
        assert_eq!(cache.snapshot(), None);
    }

    #[test]
    fn a_list_under_way_never_undoes_what_the_executor_did_meanwhile() {
        let cache = ObservedCache::default();
        cache.listing();
        // The list saw "new" created but not yet started, and "gone" before its removal.
        let mut seen_created = o("new");
        seen_created.running = false;
        cache.started(o("new"));
        cache.removed(&["gone".into()]);
        cache.replace(&[seen_created, o("gone"), o("other")]);
        let snap = cache.snapshot().unwrap();
        let ids: Vec<_> = snap.iter().map(|o| o.container_id.as_str()).collect();
        assert_eq!(ids, ["new", "other"]);
        assert!(snap[0].running, "started after the list saw it created");
    }
}
