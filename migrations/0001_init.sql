-- sandboxd schema, version 1.
-- Times are ISO-8601 UTC text (e.g. 2026-11-24T04:18:07.123456Z); ids are lowercase UUID text,
-- so `sqlite3 var/sandboxd.db` shows everything without decoding.

-- One row per chat: the desired spec (what the API declared) and the observed status
-- (what the controller last saw and did).
CREATE TABLE sandboxes (
    chat_id             TEXT PRIMARY KEY NOT NULL,
    -- desired state --------------------------------------------------------------
    session_id          TEXT NOT NULL,            -- a new session means a new container
    generation          INTEGER NOT NULL,         -- +1 for every new session of this chat
    agent_id            TEXT NOT NULL,
    volume_host_path    TEXT NOT NULL,            -- canonical absolute host path
    spec_json           TEXT NOT NULL,            -- container spec frozen for this session
    spec_hash           TEXT NOT NULL,            -- sha256 of spec_json; drift check
    created_at          TEXT NOT NULL,            -- this session's creation
    updated_at          TEXT NOT NULL,
    expires_at          TEXT NOT NULL,
    deleted_at          TEXT,                     -- set by the API; the controller finalizes
    -- observed status -------------------------------------------------------------
    phase               TEXT NOT NULL CHECK (phase IN ('pending','running','failed','expired','deleting')),
    container_id        TEXT,
    endpoint_ip         TEXT,
    endpoint_port       INTEGER,
    observed_generation INTEGER NOT NULL DEFAULT 0,
    attempts            INTEGER NOT NULL DEFAULT 0,   -- failed start attempts since the last success
    last_error          TEXT,
    next_attempt_at     TEXT,
    running_since       TEXT
) STRICT;

CREATE INDEX sandboxes_phase ON sandboxes (phase);
CREATE INDEX sandboxes_agent ON sandboxes (agent_id);

-- Append-only history of transitions. Rows are never updated.
CREATE TABLE sandbox_events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    at           TEXT NOT NULL,
    chat_id      TEXT NOT NULL,
    session_id   TEXT,
    container_id TEXT,
    action       TEXT NOT NULL,   -- e.g. session_created, start, adopt, remove, expire, purge
    outcome      TEXT NOT NULL,   -- ok | error | ...
    error        TEXT
) STRICT;

CREATE INDEX sandbox_events_chat ON sandbox_events (chat_id, id);
