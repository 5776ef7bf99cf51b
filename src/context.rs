//! What the long-lived parts of the process share, built once in `app.rs`: the store, the
//! settings, the metrics, the controller's status, the volume policy, the loop's wake-up,
//! chat storage and the data plane's call slots.
//! The API, the controller, its executor, supervisor, egress keeper, warm pool and the data
//! plane each hold one `Arc<Context>` rather than their own copies. (The backend is not in
//! it: the supervisor connects and reconnects it, and hands it out per connection.)

use std::sync::Arc;

use tokio::sync::Notify;

use crate::config::Settings;
use crate::controller::ControllerStatus;
use crate::dataplane::limits::Slots;
use crate::domain::volume::VolumePolicy;
use crate::metrics::Metrics;
use crate::storage::ChatStorage;
use crate::store::Store;

pub struct Context {
    pub store: Store,
    pub settings: Arc<Settings>,
    pub metrics: Arc<Metrics>,
    /// The controller's health, one value (readiness reads it).
    pub status: Arc<ControllerStatus>,
    /// Which host directories clients may mount.
    pub volumes: Arc<VolumePolicy>,
    /// Wakes the controller early: desired-state writes notify it.
    pub wake: Arc<Notify>,
    /// Chat storage's file systems and directories.
    pub storage: ChatStorage,
    /// Data-plane calls in flight, per chat: the data plane takes a slot per call; the
    /// executor never puts a sandbox to sleep for idleness while one is held, and a call's
    /// end restarts the idle clock.
    pub calls: Slots,
}

impl Context {
    pub fn new(store: Store, settings: Arc<Settings>, volumes: Arc<VolumePolicy>) -> Self {
        let metrics = Arc::new(Metrics::new());
        let d = &settings.data_plane;
        let clock = store.clone();
        let calls = Slots::new(
            d.max_concurrent,
            d.max_concurrent_per_sandbox,
            metrics.data_plane_in_flight.clone(),
        )
        .on_release(Arc::new(move |chat| {
            // The idle clock restarts when a call ends, not only when it begins.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let store = clock.clone();
                rt.spawn(async move {
                    if let Err(e) = store.touch(chat, chrono::Utc::now()).await {
                        tracing::warn!(error = %e, chat_id = %chat, "cannot restart the idle clock");
                    }
                });
            }
        }));
        Self {
            calls,
            storage: ChatStorage::new(&settings.storage.root),
            status: Arc::new(ControllerStatus::new(
                settings.controller.take_over_old_service,
            )),
            store,
            settings,
            metrics,
            volumes,
            wake: Arc::new(Notify::new()),
        }
    }
}
