-- The comment in V1 on sweeper_state is out of date and cannot be edited (applied migrations are checksummed):
-- a sweeper task is serialised across workers by a claim taken at the start of its run, not by a lock on its
-- sweeper_state row. The row keeps what replicas share about the task.
COMMENT ON TABLE sweeper_state IS
    'Per-task sweeper state shared by all workers: held_since (how long the stale brake has held) and last_run_at '
    '(the last run that changed something). Tasks are claimed per run, not by locking this row.';
