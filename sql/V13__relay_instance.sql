-- The relay lease names its holder in two parts: holder, the worker's identity (worker.id when configured, stable
-- across restarts; otherwise unique to one process), and instance, one run of that worker. A worker that restarts
-- with the same worker.id takes its lease back at once instead of waiting for it to expire; the run it replaces loses
-- it (its claims and renewals name the instance), so a stalled old run that wakes up stands by instead of
-- publishing beside the new one.
ALTER TABLE outbox_relay ADD COLUMN instance text NOT NULL DEFAULT '';

COMMENT ON COLUMN outbox_relay.holder IS
    'The worker holding or last holding the lease: worker.id when configured, else host, process and a random id.';
COMMENT ON COLUMN outbox_relay.instance IS
    'The run of holder that holds the lease (a random id per process start); only it claims and renews.';
