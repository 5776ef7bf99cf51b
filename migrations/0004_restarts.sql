-- sandboxd schema, version 4: crash loops are backed off.
-- Exits in a row of the session's container, each after running less than the backoff cap
-- (`controller.backoff_max_seconds`). The first exit is restarted at once; each further one
-- waits the per-chat backoff for this count. An exit after a longer run starts a new count.
ALTER TABLE sandboxes ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0;
