-- sandboxd schema, version 9: background processes (docs/dataplane.md, "Background processes").
-- One row per process started through `POST /api/v1/sandboxes/{chat_id}/processes`: what ran,
-- where, and how it ended. Its output is never here: it is kept in memory, in a bounded ring,
-- and what was written before a restart of sandboxd is lost. `marker` is the variable every
-- process of its tree inherits (how a signal or kill finds them, also after a restart);
-- `exec_id` is the engine's exec. A process is `running` until its output stream ends:
-- `exited` (with `exit_code`), `killed` (DELETE), or `lost` (its container went away, or it
-- ended while sandboxd was down and the engine no longer knows its exit code).
CREATE TABLE processes (
    process_id   TEXT PRIMARY KEY NOT NULL,
    chat_id      TEXT NOT NULL,
    session_id   TEXT NOT NULL,
    container_id TEXT NOT NULL,
    exec_id      TEXT NOT NULL,
    marker       TEXT NOT NULL,
    command      TEXT NOT NULL,            -- JSON argv, as asked (cut at 1 KiB)
    workdir      TEXT NOT NULL,
    pid          INTEGER,                  -- in the sandbox's PID namespace
    state        TEXT NOT NULL CHECK (state IN ('running','exited','killed','lost')),
    exit_code    INTEGER,
    started_at   TEXT NOT NULL,            -- ISO-8601 UTC
    ended_at     TEXT,
    output_bytes INTEGER NOT NULL DEFAULT 0 -- stdout and stderr, when it ended
);
CREATE INDEX processes_by_chat ON processes (chat_id, started_at);
