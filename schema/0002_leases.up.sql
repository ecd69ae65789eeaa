-- Partition leases, used only by publishers run with --partitions: several
-- active publishers, each publishing the entities of the partitions it
-- leases. A single-leader publisher never touches these tables.

-- Publishers taking part, one row each, refreshed every heartbeat. A row not
-- seen for the lease time is a publisher that is gone.
CREATE TABLE IF NOT EXISTS {{.Replicas}} (
    replica_id text        PRIMARY KEY,
    partitions integer     NOT NULL CHECK (partitions > 0),
    seen_at    timestamptz NOT NULL DEFAULT now()
);

-- Who may publish which partition, and until when (database time, so the
-- publishers' clocks never matter). partitions is the partition count the
-- owner hashes with: owners that disagree on it must never run together.
CREATE TABLE IF NOT EXISTS {{.Leases}} (
    part        integer     PRIMARY KEY CHECK (part >= 0 AND part < partitions),
    partitions  integer     NOT NULL,
    owner       text        NOT NULL,
    expires_at  timestamptz NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now()
);
