-- Heartbeat freshness is measured from when the agent spoke. The worker knows when it received a heartbeat (a
-- monotonic clock, translated into the database clock); the agent's sent_at says how long it travelled before that,
-- read against this connection's clock offset: the largest (sent_at - received) seen, which is the agent's clock
-- skew less the smallest travel time (an NTP-style estimate). The estimate is the maximum over a sliding window of
-- received time, kept as two buckets: clock_offset_prev (the previous bucket's maximum) and clock_offset_cur (the
-- current one's, started at clock_bucket_at). So a steady skew of any size cancels out, and a step of the agent's
-- clock is forgotten within two buckets; a burst of heartbeats held anywhere (a paused worker's socket) is judged
-- against the offset measured before it.
ALTER TABLE agent_connection
    ADD COLUMN clock_offset_prev double precision,
    ADD COLUMN clock_offset_cur double precision,
    ADD COLUMN clock_bucket_at timestamptz;
COMMENT ON COLUMN agent_connection.clock_offset_cur IS
    'Largest sent_at - received (seconds) of the heartbeats received since clock_bucket_at; with clock_offset_prev '
    '(the bucket before), the estimate of the agent''s clock offset less the smallest travel time.';

-- One heartbeat against a connection's clock offset: when the agent spoke, in the database clock, and the new
-- offset columns. `sent` is the heartbeat's sent_at (NULL when it gave none: it then spoke when it was received),
-- `recv` when the worker received it, `bucket` the bucket length in seconds.
CREATE FUNCTION acm_heartbeat_clock(
    prev double precision, cur double precision, bucket_at timestamptz, sent timestamptz, recv timestamptz,
    bucket double precision,
    OUT spoke timestamptz, OUT new_prev double precision, OUT new_cur double precision, OUT new_at timestamptz)
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN s IS NULL THEN recv
                ELSE recv - greatest(0, greatest(np, nc) - s) * interval '1 second' END,
           np, nc, na
    FROM (SELECT s,
                 CASE WHEN s IS NULL THEN prev WHEN rot THEN coalesce(cur, s) ELSE coalesce(prev, s) END AS np,
                 CASE WHEN s IS NULL THEN cur WHEN rot THEN s ELSE greatest(cur, s) END AS nc,
                 CASE WHEN s IS NULL THEN bucket_at WHEN rot THEN recv ELSE bucket_at END AS na
          FROM (SELECT extract(epoch FROM sent - recv)::float8 AS s,
                       bucket_at IS NULL OR cur IS NULL OR recv - bucket_at >= bucket * interval '1 second' AS rot) a) b
$$;

-- Per-agent limits count an agent's active connections and open instructions when it opens more.
CREATE INDEX agent_connection_active_agent ON agent_connection (agent_id) WHERE status = 'active';
CREATE INDEX agent_instruction_open_agent ON agent_instruction (agent_id) WHERE status IN ('pending', 'sent');
