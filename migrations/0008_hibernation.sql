-- sandboxd schema, version 8: hibernation (docs/hibernation.md).
-- A sandbox's declared state (`desired_state`: running, paused or hibernated) sits beside
-- the spec; the observed `phase` gains `paused` and `hibernated`, and `pausing` and
-- `hibernating` while the engine call is under way (written before it). `last_active_at` is the
-- idle clock (create/reuse, exec, file calls, renew and resume set it): with
-- `sandbox.idle_pause_seconds` / `sandbox.idle_hibernate_seconds` an idle sandbox is paused
-- or hibernated without any write, and comes back on its next call.
-- SQLite cannot change a CHECK constraint in place, so the table is rebuilt (same columns,
-- same order, plus the two new ones); nothing else refers to it.
CREATE TABLE sandboxes_v8 (
    chat_id             TEXT PRIMARY KEY NOT NULL,
    session_id          TEXT NOT NULL,
    generation          INTEGER NOT NULL,
    agent_id            TEXT NOT NULL,
    volume_host_path    TEXT NOT NULL,
    spec_json           TEXT NOT NULL,
    spec_hash           TEXT NOT NULL,
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL,
    expires_at          TEXT NOT NULL,
    deleted_at          TEXT,
    phase               TEXT NOT NULL CHECK (phase IN ('pending','running','failed','expired',
                                                       'deleting','pausing','paused',
                                                       'hibernating','hibernated')),
    container_id        TEXT,
    endpoint_ip         TEXT,
    endpoint_port       INTEGER,
    observed_generation INTEGER NOT NULL DEFAULT 0,
    attempts            INTEGER NOT NULL DEFAULT 0,
    last_error          TEXT,
    next_attempt_at     TEXT,
    running_since       TEXT,
    legacy_container_id TEXT,
    restarts            INTEGER NOT NULL DEFAULT 0,
    host_port           INTEGER,
    desired_state       TEXT NOT NULL DEFAULT 'running'
                        CHECK (desired_state IN ('running','paused','hibernated')),
    last_active_at      TEXT
) STRICT;

INSERT INTO sandboxes_v8 (chat_id, session_id, generation, agent_id, volume_host_path,
    spec_json, spec_hash, created_at, updated_at, expires_at, deleted_at, phase, container_id,
    endpoint_ip, endpoint_port, observed_generation, attempts, last_error, next_attempt_at,
    running_since, legacy_container_id, restarts, host_port, desired_state, last_active_at)
SELECT chat_id, session_id, generation, agent_id, volume_host_path, spec_json, spec_hash,
    created_at, updated_at, expires_at, deleted_at, phase, container_id, endpoint_ip,
    endpoint_port, observed_generation, attempts, last_error, next_attempt_at, running_since,
    legacy_container_id, restarts, host_port, 'running', updated_at
FROM sandboxes;

DROP TABLE sandboxes;
ALTER TABLE sandboxes_v8 RENAME TO sandboxes;
CREATE INDEX sandboxes_phase ON sandboxes (phase);
CREATE INDEX sandboxes_agent ON sandboxes (agent_id);
