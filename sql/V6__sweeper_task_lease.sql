-- Sweeper tasks are claimed with a lease row instead of a session-level advisory lock, so that the claim holds
-- whatever connection each of the task's statements runs on (behind PgBouncer in transaction pooling mode no
-- session state survives a transaction). Claiming is one statement that takes the row when it is free or expired,
-- or renews it when it is the claimer's own; the holder renews it while a long run goes on and frees it at the end.
-- A holder that dies loses the task when expires_at passes.
--
-- UNLOGGED: a claim writes no WAL, so the idle cycle's claims commit without waiting for the disk. After a crash the
-- table is empty, which only means every task is free, as it would be once the leases expired.
CREATE UNLOGGED TABLE sweeper_lease (
    task       text PRIMARY KEY,
    holder     text        NOT NULL,
    expires_at timestamptz NOT NULL
);

COMMENT ON TABLE sweeper_lease IS
    'Which worker runs each sweeper task: holder (host, process and a random id) holds it until expires_at; a row '
    'whose expires_at has passed (a finished run sets -infinity) is free. Unlogged: empty after a crash.';
