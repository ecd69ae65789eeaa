-- Payloads are stored as bytea, so a consumer receives exactly the bytes
-- the service wrote: jsonb normalises a document (key order, duplicate
-- keys, the spelling of numbers, spacing) and takes only JSON.
--
-- An existing table is converted without rewriting it under an exclusive
-- lock. Each step below, up to the next "-- outbox:" line, is its own
-- transaction (see schema.Step):
--
--  1. add the new column, and a trigger that fills it for rows written or
--     changed meanwhile by writers still on jsonb (brief exclusive lock,
--     no scan);
--  2. copy the payloads of existing rows in batches of {{.BatchSize}} rows
--     along seq, one short transaction each; the copied bytes are jsonb's
--     text, which is what consumers were sent until now;
--  3. prove the column is filled with a NOT VALID check, validated without
--     blocking reads or writes;
--  4. swap the columns (brief exclusive lock, no scan: SET NOT NULL uses
--     the validated check).
--
-- Every step is safe to run again, so a migration stopped halfway resumes
-- where it was.
SET LOCAL lock_timeout = '2s';
ALTER TABLE {{.Events}} ADD COLUMN IF NOT EXISTS event_data_new bytea;

CREATE OR REPLACE FUNCTION {{.DataCopyFunc}}() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.event_data_new := convert_to(NEW.event_data::text, 'UTF8');
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS {{.DataCopyTrigger}} ON {{.Events}};
CREATE TRIGGER {{.DataCopyTrigger}}
    BEFORE INSERT OR UPDATE OF event_data ON {{.Events}}
    FOR EACH ROW EXECUTE FUNCTION {{.DataCopyFunc}}();

-- One batch: copies the rows after seq "after" that still need it, and
-- returns the last seq it looked at, or NULL when there are none left.
CREATE OR REPLACE FUNCTION {{.DataBackfillFunc}}(after bigint) RETURNS bigint
LANGUAGE sql AS $$
    WITH batch AS (
        SELECT seq FROM {{.Events}} WHERE seq > after ORDER BY seq LIMIT {{.BatchSize}}
    ), copied AS (
        UPDATE {{.Events}} e SET event_data_new = convert_to(e.event_data::text, 'UTF8')
        FROM batch WHERE e.seq = batch.seq AND e.event_data_new IS NULL
    )
    SELECT max(seq) FROM batch
$$;

-- outbox:batched
SELECT {{.DataBackfillFunc}}($1);

-- outbox:step
SET LOCAL lock_timeout = '2s';
ALTER TABLE {{.Events}} DROP CONSTRAINT IF EXISTS {{.DataCheck}};
ALTER TABLE {{.Events}} ADD CONSTRAINT {{.DataCheck}} CHECK (event_data_new IS NOT NULL) NOT VALID;

-- outbox:step
ALTER TABLE {{.Events}} VALIDATE CONSTRAINT {{.DataCheck}};

-- outbox:step
SET LOCAL lock_timeout = '2s';
DROP TRIGGER {{.DataCopyTrigger}} ON {{.Events}};
DROP FUNCTION {{.DataCopyFunc}}();
DROP FUNCTION {{.DataBackfillFunc}}(bigint);
ALTER TABLE {{.Events}} DROP COLUMN event_data;
ALTER TABLE {{.Events}} RENAME COLUMN event_data_new TO event_data;
ALTER TABLE {{.Events}} ALTER COLUMN event_data SET NOT NULL;
ALTER TABLE {{.Events}} DROP CONSTRAINT {{.DataCheck}};
