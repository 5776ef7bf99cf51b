-- sandboxd schema, version 6: the warm pool (docs/architecture.md, "Warm starts"). Each row is
-- a pre-started container waiting for a chat, or one claimed by a chat. `state` goes
-- starting → idle → claiming → claimed; a row found `claiming` after a restart was never bound
-- completely, so its container is removed and the chat starts cold. `slot` names the member's
-- host directory (<warm_pool.root>/<slot>), onto which a claim bind-mounts the chat directory
-- and the request volume.
CREATE TABLE pool_members (
    slot         TEXT PRIMARY KEY,
    class_hash   TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('starting', 'idle', 'claiming', 'claimed')),
    container_id TEXT,
    endpoint_ip  TEXT,
    chat_id      TEXT,
    session_id   TEXT,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL
);
CREATE INDEX pool_members_idle ON pool_members (class_hash, state, created_at);
CREATE INDEX pool_members_container ON pool_members (container_id);
