-- Back to jsonb. This rewrites the table under an exclusive lock, and fails
-- (changing nothing) if any payload is not valid JSON in UTF-8.
ALTER TABLE {{.Events}} ALTER COLUMN event_data TYPE jsonb
    USING convert_from(event_data, 'UTF8')::jsonb;
