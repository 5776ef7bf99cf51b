//! Images that just appeared on the engine. A start that failed because its image was missing
//! (pull policy `never`) waits its backoff; when the engine reports the image tagged, pulled,
//! loaded or imported, the next pass treats that session as due at once. Only an accelerator:
//! without the event the backoff brings the retry anyway.

use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::domain::Phase;
use crate::store::SandboxRow;

/// How long an appearance is remembered: long enough for the pass it wakes.
const WINDOW: Duration = Duration::from_secs(60);

#[derive(Default)]
pub(super) struct AppearedImages(Mutex<Vec<(String, DateTime<Utc>)>>);

impl AppearedImages {
    pub(super) fn record(&self, name: String, at: DateTime<Utc>) {
        let mut seen = self.lock();
        let window = chrono::Duration::from_std(WINDOW).unwrap_or(chrono::Duration::MAX);
        seen.retain(|(_, t)| at - *t < window);
        seen.push((name, at));
    }

    /// Whether `row` waits out a backoff for an image that has appeared since it failed.
    pub(super) fn unblocks(&self, row: &SandboxRow) -> bool {
        if row.phase != Phase::Failed {
            return false;
        }
        let Some(error) = row.last_error.as_deref() else {
            return false;
        };
        self.lock().iter().any(|(name, at)| {
            let short = name.strip_suffix(":latest").unwrap_or(name);
            *at >= row.updated_at
                && (error.contains(&format!("image `{name}` is not present"))
                    || error.contains(&format!("image `{short}` is not present")))
        })
    }

    // Each change is one retain and push: a panic elsewhere cannot leave it half-done.
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, DateTime<Utc>)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
