-- One AMQP prefix per database. The outbox, the relay lease, the sweeper leases and the idempotency records are not
-- keyed by prefix, so two prefixes sharing a database would publish each other's events and split each other's
-- leases. The first worker that starts records its amqp.prefix here; a worker with another prefix refuses to start,
-- naming both. Give each prefix its own database (on one server if you like).
CREATE TABLE database_prefix (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    prefix      text        NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE database_prefix IS
    'The amqp.prefix this database serves, recorded by the first worker that started on it; workers with another '
    'prefix refuse to start. Delete the row to hand the database to another prefix (with no worker running).';
