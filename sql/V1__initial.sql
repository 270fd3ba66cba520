-- agent-connection-manager: initial schema.
-- Every timestamp is timestamptz and written from the database clock (now()).

CREATE TYPE session_status AS ENUM ('active', 'inactive', 'ended');
CREATE TYPE connection_status AS ENUM ('active', 'closed');
CREATE TYPE close_reason AS ENUM ('client_disconnect', 'session_closed', 'stale_connection');
CREATE TYPE instruction_status AS ENUM ('pending', 'sent', 'acknowledged', 'expired', 'cancelled');
-- Enum order is the sort order: low < normal < high < critical.
CREATE TYPE instruction_priority AS ENUM ('low', 'normal', 'high', 'critical');
CREATE TYPE ack_status AS ENUM ('received', 'processed', 'failed', 'declined');

CREATE TABLE agent_session (
    session_id              text PRIMARY KEY,
    agent_id                text NOT NULL,
    acquisition_uuid        text,
    name                    text NOT NULL,
    description             text,
    experimental_parameters jsonb,
    status                  session_status NOT NULL DEFAULT 'active',
    created_at              timestamptz NOT NULL DEFAULT now(),
    last_activity_at        timestamptz NOT NULL DEFAULT now(),
    ended_at                timestamptz
);
-- Inactive sweep and the active-session count: only active rows can become due.
CREATE INDEX agent_session_active_activity ON agent_session (last_activity_at) WHERE status = 'active';
-- The inactive-session count of the stats.
CREATE INDEX agent_session_inactive ON agent_session (session_id) WHERE status = 'inactive';
CREATE INDEX agent_session_agent ON agent_session (agent_id);

CREATE TABLE agent_connection (
    connection_id     text PRIMARY KEY,
    session_id        text NOT NULL REFERENCES agent_session (session_id),
    agent_id          text NOT NULL,
    connection_type   text NOT NULL,
    client_info       jsonb,
    status            connection_status NOT NULL DEFAULT 'active',
    created_at        timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at timestamptz NOT NULL DEFAULT now(),
    closed_at         timestamptz,
    close_reason      close_reason
);
-- Stale sweep and the active-connection count.
CREATE INDEX agent_connection_active_heartbeat ON agent_connection (last_heartbeat_at) WHERE status = 'active';
-- Closing a session closes its active connections.
CREATE INDEX agent_connection_active_session ON agent_connection (session_id) WHERE status = 'active';

CREATE TABLE agent_instruction (
    instruction_id       uuid PRIMARY KEY,
    session_id           text NOT NULL REFERENCES agent_session (session_id),
    agent_id             text NOT NULL,
    instruction_type     text NOT NULL,
    payload              jsonb NOT NULL,
    sequence_number      bigint,
    priority             instruction_priority NOT NULL DEFAULT 'normal',
    status               instruction_status NOT NULL DEFAULT 'pending',
    created_at           timestamptz NOT NULL DEFAULT now(),
    sent_at              timestamptz,
    acknowledged_at      timestamptz,
    expires_at           timestamptz,
    retry_count          integer NOT NULL DEFAULT 0 CHECK (retry_count >= 0),
    max_retries          integer NOT NULL CHECK (max_retries >= 0),
    instruction_metadata jsonb,
    connection_id        text,
    ack_status           ack_status,
    CHECK (retry_count <= max_retries)
);
-- Expiry sweep: only open instructions with a deadline can become due.
CREATE INDEX agent_instruction_open_deadline ON agent_instruction (expires_at)
    WHERE status IN ('pending', 'sent') AND expires_at IS NOT NULL;
-- Closing a session cancels its open instructions; stats count open instructions by status.
CREATE INDEX agent_instruction_open_session ON agent_instruction (session_id, status)
    WHERE status IN ('pending', 'sent');
CREATE INDEX agent_instruction_open_status ON agent_instruction (status)
    WHERE status IN ('pending', 'sent');

CREATE TABLE agent_instruction_acknowledgement (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instruction_id     uuid NOT NULL REFERENCES agent_instruction (instruction_id),
    agent_id           text NOT NULL,
    session_id         text NOT NULL,
    status             ack_status NOT NULL,
    result             jsonb,
    error_message      text,
    processing_time_ms bigint,
    processed_at       timestamptz,
    acknowledged_at    timestamptz NOT NULL DEFAULT now(),
    accepted           boolean NOT NULL
);
CREATE INDEX agent_instruction_acknowledgement_instruction ON agent_instruction_acknowledgement (instruction_id);

-- Idempotency: a command with an AMQP message_id is applied once; its reply is kept for redeliveries.
CREATE TABLE processed_message (
    message_type text NOT NULL,
    message_id   text NOT NULL,
    reply        jsonb,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (message_type, message_id)
);
CREATE INDEX processed_message_processed_at ON processed_message (processed_at);

-- Transactional outbox: written in the transaction of the change it reports, relayed with publisher confirms.
CREATE TABLE event_outbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     uuid NOT NULL UNIQUE,
    event_type   text NOT NULL,
    payload      jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX event_outbox_unpublished ON event_outbox (id) WHERE published_at IS NULL;
CREATE INDEX event_outbox_published ON event_outbox (published_at) WHERE published_at IS NOT NULL;

-- Wake relays as soon as events commit (notifications are delivered at commit).
CREATE FUNCTION event_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('acm_outbox', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER event_outbox_notify AFTER INSERT ON event_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION event_outbox_notify();

-- Per-task sweeper state shared by all replicas: the row lock serialises a task's cycle,
-- held_since remembers how long the stale brake has been holding.
CREATE TABLE sweeper_state (
    task        text PRIMARY KEY,
    held_since  timestamptz,
    last_run_at timestamptz
);
INSERT INTO sweeper_state (task) VALUES
    ('stale_connections'), ('inactive_sessions'), ('instruction_expiry'), ('retention');
