-- The operator's pause switch: one row. While paused is true, every
-- publisher of the events table (single leader or partitioned) claims
-- nothing; writers go on writing and events stay READY.
CREATE TABLE IF NOT EXISTS {{.Control}} (
    id        boolean     PRIMARY KEY DEFAULT true CHECK (id),
    paused    boolean     NOT NULL DEFAULT false,
    paused_at timestamptz,
    paused_by text
);
INSERT INTO {{.Control}} (id) VALUES (true) ON CONFLICT DO NOTHING;
