-- sandboxd schema, version 3: taking over from the old Python service.
-- A running container the old service started is adopted at start-up as a session of its own
-- (same session id, container, endpoint and expiry). This column names that container while
-- the session lasts: sandboxd watches it by id, never restarts it and never replaces it for
-- drift; it is removed at expiry or delete like any other.
ALTER TABLE sandboxes ADD COLUMN legacy_container_id TEXT;

-- Every old-service session ever adopted. A session is adopted at most once: a container
-- listed before its chat was deleted can never bring the chat back at a later connect.
CREATE TABLE legacy_adoptions (
    session_id   TEXT PRIMARY KEY NOT NULL,
    chat_id      TEXT NOT NULL,
    container_id TEXT NOT NULL,
    adopted_at   TEXT NOT NULL
) STRICT;
