-- Agents' log lines (agent.log), read back with logs.get. Partitioned by the day the worker received them
-- (received_at, the database clock, UTC days), so that retention drops a whole partition instead of deleting rows,
-- and an agent's clock cannot put a line in a partition that does not exist. Partitions are named
-- agent_log_YYYYMMDD and created ahead of time by the sweeper task log_partitions (and by ingest itself when the day's
-- partition is missing). id is increasing: ingest transactions take a transaction-level advisory lock before they
-- insert, so ids become visible in increasing order and a reader following since_id misses none.
CREATE TABLE agent_log (
    id          bigserial   NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    agent_id    text        NOT NULL,
    session_id  text        NOT NULL,
    logged_at   timestamptz NOT NULL,
    -- Python's numbers: 10 DEBUG, 20 INFO, 30 WARNING, 40 ERROR, 50 CRITICAL.
    level       smallint    NOT NULL,
    logger_name text        NOT NULL,
    message     text        NOT NULL,
    PRIMARY KEY (id, received_at)
) PARTITION BY RANGE (received_at);
-- logs.get by session or by agent, in id order.
CREATE INDEX agent_log_session ON agent_log (session_id, id);
CREATE INDEX agent_log_agent ON agent_log (agent_id, id);

COMMENT ON TABLE agent_log IS
    'Agents'' log lines, partitioned by the UTC day of received_at (agent_log_YYYYMMDD); retention drops partitions.';

INSERT INTO sweeper_state (task) VALUES ('log_partitions');
