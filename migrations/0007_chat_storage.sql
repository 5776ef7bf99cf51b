-- sandboxd schema, version 7: chat storage (docs/storage.md). A workspace belongs to one user
-- and has a quota, held by the kernel: its chats live on a file system of their own, sized
-- to it. Each chat owns one directory (the one its sandbox mounts at the chat path) holding
-- `history.md` and its attachments; `chat_files` is the attachments' metadata (never their
-- contents). Times are ISO-8601 UTC.
CREATE TABLE workspaces (
    workspace_id TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL UNIQUE,
    quota_bytes  INTEGER NOT NULL CHECK (quota_bytes > 0),
    created_at   TEXT NOT NULL
);

CREATE TABLE chats (
    chat_id      TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL REFERENCES workspaces (workspace_id),
    created_at   TEXT NOT NULL
);
CREATE INDEX chats_workspace ON chats (workspace_id, created_at);

CREATE TABLE chat_files (
    file_id      TEXT PRIMARY KEY,
    chat_id      TEXT NOT NULL REFERENCES chats (chat_id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    content_type TEXT,
    size_bytes   INTEGER NOT NULL CHECK (size_bytes >= 0),
    created_at   TEXT NOT NULL,
    UNIQUE (chat_id, name)
);
