-- Heartbeats as HOT updates. A heartbeat moves agent_connection.last_heartbeat_at forward; while that column was
-- an index key, every heartbeat wrote a new entry into every index of the table. The stale sweep now finds its
-- candidates through heartbeat_minute, last_heartbeat_at rounded down to the minute (computed by the database, so
-- every writer keeps it right): a heartbeat changes it at most once a minute, and the other heartbeats of that
-- minute change no index key and can be HOT (heap-only) updates. Since heartbeat_minute <= last_heartbeat_at, a
-- connection whose last heartbeat is older than a threshold has a heartbeat_minute older than it too, so the sweep
-- filters on both: the index bounds the scan, the exact time decides.
ALTER TABLE agent_connection
    ADD COLUMN heartbeat_minute timestamptz
        GENERATED ALWAYS AS (date_bin('1 minute', last_heartbeat_at, timestamptz '2000-01-01 00:00:00+00')) STORED;
-- Room on each page for the new versions of its rows: a HOT update needs free space on the row's own page. The
-- ADD COLUMN above rewrites the table, so the existing pages get it too.
ALTER TABLE agent_connection SET (fillfactor = 70);
DROP INDEX agent_connection_active_heartbeat;
-- Stale sweep: active connections by the minute of their last heartbeat.
CREATE INDEX agent_connection_active_heartbeat_minute ON agent_connection (heartbeat_minute) WHERE status = 'active';
COMMENT ON COLUMN agent_connection.heartbeat_minute IS
    'last_heartbeat_at rounded down to the minute; indexed for the stale sweep instead of last_heartbeat_at, so '
    'that most heartbeats change no index key.';
