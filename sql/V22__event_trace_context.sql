-- The W3C trace context of the work that wrote an event (a command's, continuing its caller's traceparent; a
-- heartbeat batch's; a sweeper cycle's), published with the event as AMQP headers traceparent and tracestate.
-- NULL for events written before this migration or outside any traced work.
ALTER TABLE event_outbox
    ADD COLUMN traceparent text,
    ADD COLUMN tracestate text;
