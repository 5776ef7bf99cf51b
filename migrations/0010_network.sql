-- sandboxd schema, version 10: the network a session's container is on.
-- One bridge network holds at most 1,023 containers, so past `sandbox.network_capacity`
-- sandboxes go on further networks of the same settings (`sandbox`, `sandbox-1`, …;
-- docs/scale-out.md). The endpoint's address is on this network; NULL while no container
-- runs, and for rows written before this version (their network is the profile's).
ALTER TABLE sandboxes ADD COLUMN network TEXT;
