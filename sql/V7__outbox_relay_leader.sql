-- One relay at a time publishes the outbox, under a lease kept in outbox_relay; published rows are deleted.
--
-- Before: every relay leased each row it claimed (an UPDATE of lease_until and leased_by), marked it published with
-- a second UPDATE (published_at, a key of both outbox indexes, so never a HOT update), and kept published rows until
-- retention deleted them; a per-statement trigger sent NOTIFY acm_outbox on every commit that wrote events (commits
-- with notifications are serialised by a cluster-wide lock, and LISTEN does not work through a transaction pooler).
--
-- Now: the relay that holds the one row of outbox_relay (its lease_until in the future) is the only one that claims
-- and publishes; the others stand by and take the lease over once it expires. The holder renews the lease as it
-- claims batches, reads rows in id order with no write to them, and deletes a batch by id once the broker confirmed
-- it: every row in event_outbox is unpublished. Relays wake from their own process when it commits events and poll
-- for the rest (outbox.poll_interval_ms); there is no trigger and no NOTIFY.

CREATE TABLE outbox_relay (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    holder      text NOT NULL,
    lease_until timestamptz NOT NULL,
    acquired_at timestamptz NOT NULL
);
INSERT INTO outbox_relay (holder, lease_until, acquired_at) VALUES ('', '-infinity', '-infinity');

COMMENT ON TABLE outbox_relay IS
    'The relay lease: the relay named by holder publishes the outbox while lease_until is in the future; the others '
    'stand by and take the lease over once it has passed.';
COMMENT ON COLUMN outbox_relay.holder IS 'The relay (host, process and a random id) that holds or last held the lease.';
COMMENT ON COLUMN outbox_relay.acquired_at IS 'When holder took the lease (renewals keep it).';

DROP TRIGGER event_outbox_notify ON event_outbox;
DROP FUNCTION event_outbox_notify();

-- Published rows are no longer kept: delete those retention had not deleted yet, then what only they needed.
DELETE FROM event_outbox WHERE published_at IS NOT NULL;
DROP INDEX event_outbox_published;
DROP INDEX event_outbox_unpublished;
ALTER TABLE event_outbox
    DROP COLUMN published_at,
    DROP COLUMN lease_until,
    DROP COLUMN leased_by;

COMMENT ON TABLE event_outbox IS
    'Events not yet published, written in the transaction of the change they report; the relay deletes them by id '
    'once the broker confirmed them.';
