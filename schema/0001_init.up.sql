-- Events written by services in their own transactions and moved to NATS
-- JetStream by the publisher. {{.Events}} and friends are quoted
-- identifiers filled in by the schema package.
CREATE TABLE IF NOT EXISTS {{.Events}} (
    event_id     uuid        PRIMARY KEY,
    seq          bigint      GENERATED ALWAYS AS IDENTITY,
    event_target text        NOT NULL,
    event_type   text        NOT NULL,
    entity_type  text        NOT NULL,
    entity_id    text        NOT NULL,
    event_data   jsonb       NOT NULL,
    headers      jsonb       NOT NULL DEFAULT '{}',
    event_status text        NOT NULL DEFAULT 'READY'
                 CHECK (event_status IN ('READY', 'SUCCESS', 'FAILED')),
    attempts     integer     NOT NULL DEFAULT 0,
    last_error   text,
    available_at timestamptz NOT NULL DEFAULT now(),
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);

CREATE UNIQUE INDEX IF NOT EXISTS {{.SeqIndex}} ON {{.Events}} (seq);

-- Polling touches only READY rows, however many SUCCESS rows the table keeps.
CREATE INDEX IF NOT EXISTS {{.ReadyIndex}} ON {{.Events}} (seq)
    WHERE event_status = 'READY';

-- The claim's "no earlier FAILED or retrying event of this entity" check.
-- Only events that block their entity are in it, so the check stays cheap
-- however long an entity's READY backlog is.
CREATE INDEX IF NOT EXISTS {{.BlockedIndex}} ON {{.Events}} (entity_type, entity_id, seq)
    WHERE event_status = 'FAILED' OR (event_status = 'READY' AND attempts > 0);

-- An entity's history, in seq order.
CREATE INDEX IF NOT EXISTS {{.EntityIndex}} ON {{.Events}} (entity_type, entity_id, seq);

-- Wakes a sleeping publisher. One notification per INSERT statement at
-- most, with no payload, delivered at commit; the publisher then polls.
--
-- NOTIFY is costly for writers: a committing transaction that sent one holds
-- a database-wide lock until its commit record is flushed, so such commits
-- cannot share a WAL flush. So the trigger notifies only while a publisher
-- sleeps, which the publisher shows by holding the advisory lock
-- ({{.SleepNamespace}}, table oid). A working publisher polls on its own.
-- Otherwise the trigger takes that lock shared until commit, which keeps a
-- publisher from going to sleep while this insert is uncommitted: it could
-- not see the row, and would not be woken for it.
CREATE OR REPLACE FUNCTION {{.NotifyFunc}}() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock_shared({{.SleepNamespace}}, TG_RELID::int) THEN
        PERFORM pg_notify('outbox_' || TG_RELID::text, '');
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS {{.NotifyTrigger}} ON {{.Events}};
CREATE TRIGGER {{.NotifyTrigger}}
    AFTER INSERT ON {{.Events}}
    FOR EACH STATEMENT EXECUTE FUNCTION {{.NotifyFunc}}();

-- Messages a consumer has handled, written in the consumer's transaction.
CREATE TABLE IF NOT EXISTS {{.Processed}} (
    consumer_id  text        NOT NULL,
    message_id   text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_id, message_id)
);

CREATE INDEX IF NOT EXISTS {{.ProcessedAtIndex}} ON {{.Processed}} (processed_at);
