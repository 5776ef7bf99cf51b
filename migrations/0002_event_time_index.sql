-- Retention deletes events by time; without this index that is a full scan under the write lock.
CREATE INDEX sandbox_events_at ON sandbox_events (at);
