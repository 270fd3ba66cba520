-- The relay claims outbox rows with a lease instead of holding a transaction open while it publishes: a claim sets
-- lease_until (and who holds it) in one short transaction, the batch is published with no transaction open, and a
-- second short transaction marks it published. A relay that dies loses its lease when lease_until passes; another
-- relay then publishes the rows again, with the same event_id.
ALTER TABLE event_outbox
    ADD COLUMN lease_until timestamptz,
    ADD COLUMN leased_by   text;

COMMENT ON COLUMN event_outbox.lease_until IS
    'While in the future, the relay named by leased_by is publishing this unpublished row; others skip it.';
COMMENT ON COLUMN event_outbox.leased_by IS
    'The relay (host, process and a random id) that last claimed this row.';
