-- sandboxd schema, version 3: taking over from the old Python service.
-- A running container the old service started is adopted at start-up as a session of its own
-- (same session id, container, endpoint and expiry). This column names that container while
-- the session lasts: sandboxd watches it by id, never restarts it and never replaces it for
-- drift; it is removed at expiry or delete like any other.
ALTER TABLE sandboxes ADD COLUMN legacy_container_id TEXT;
