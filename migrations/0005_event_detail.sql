-- sandboxd schema, version 5: events say what the chat's phase was right after them (the
-- watch stream's `phase`; NULL once the row is gone), who asked for data-plane calls, and what
-- they carried (JSON: a command and exit code, a path and byte count; never outputs or file
-- contents). Published host ports are kept with the endpoint.
ALTER TABLE sandbox_events ADD COLUMN phase TEXT;
ALTER TABLE sandbox_events ADD COLUMN actor TEXT;
ALTER TABLE sandbox_events ADD COLUMN detail TEXT;
ALTER TABLE sandboxes ADD COLUMN host_port INTEGER;
