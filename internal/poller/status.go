package poller

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/lib/pq"

	"github.com/pgnats/outbox/schema"
)

// Status is a snapshot of an events table, for `publisher status`.
type Status struct {
	Table  string         `json:"table"`
	Counts map[string]int `json:"counts"` // by event_status
	// SuccessEstimated is true when Counts["SUCCESS"] is the planner's
	// estimate (StatusOptions.EstimateSuccess), not a count.
	SuccessEstimated bool            `json:"success_estimated,omitempty"`
	Retrying         int             `json:"retrying"`
	OldestReadyAge   *time.Duration  `json:"oldest_ready_age_ns,omitempty"`
	Blocked          []BlockedEntity `json:"blocked_entities"`
	BlockedTotal     int             `json:"blocked_entities_total"`
	RecentFailed     []FailedEvent   `json:"recent_failed"`
	Leader           *LeaderInfo     `json:"leader,omitempty"`
	// Replicas are the publishers run with --partitions that were seen
	// within their lease time, with the partitions each holds.
	Replicas []ReplicaInfo `json:"replicas,omitempty"`
	// Pause is the table's pause switch (publisher pause / resume).
	Pause PauseInfo `json:"pause"`
}

// PauseInfo is the pause switch in Status.
type PauseInfo struct {
	Paused bool       `json:"paused"`
	At     *time.Time `json:"changed_at,omitempty"` // when it was last set
	By     string     `json:"changed_by,omitempty"` // who last set it
}

// ReplicaInfo is one partitioned publisher.
type ReplicaInfo struct {
	ID         string    `json:"replica_id"`
	Partitions int       `json:"partitions"` // the count it hashes with
	Held       []int64   `json:"held"`       // partitions it holds an unexpired lease on
	SeenAt     time.Time `json:"seen_at"`
}

// BlockedEntity is an entity with an event that is FAILED or waiting for
// a retry not yet due, which holds back its later events: the rule the
// claim applies (a READY event whose retry is due blocks nothing).
type BlockedEntity struct {
	EntityType string    `json:"entity_type"`
	EntityID   string    `json:"entity_id"`
	EventID    string    `json:"blocking_event_id"`
	Status     string    `json:"blocking_status"`
	Attempts   int       `json:"attempts"`
	LastError  string    `json:"last_error"`
	RetryAt    time.Time `json:"retry_at"`
	Waiting    int       `json:"waiting_events"`
}

// FailedEvent is a FAILED row with its reason.
type FailedEvent struct {
	EventID    string    `json:"event_id"`
	Subject    string    `json:"subject"`
	EntityType string    `json:"entity_type"`
	EntityID   string    `json:"entity_id"`
	Attempts   int       `json:"attempts"`
	LastError  string    `json:"last_error"`
	CreatedAt  time.Time `json:"created_at"`
}

// LeaderInfo describes the session holding the leader lock.
type LeaderInfo struct {
	PID          int        `json:"pid"`
	ClientAddr   string     `json:"client_addr"`
	BackendSince *time.Time `json:"backend_start,omitempty"`
}

// ReadStatus reads the status of table. limit bounds the blocked and
// failed lists. The counts are exact: it counts every row of the table.
func ReadStatus(ctx context.Context, db *sql.DB, table string, limit int) (*Status, error) {
	return ReadStatusWith(ctx, db, table, StatusOptions{Limit: limit})
}

// StatusOptions shapes ReadStatusWith.
type StatusOptions struct {
	// Limit bounds the blocked and failed lists. Default 10.
	Limit int
	// EstimateSuccess counts READY and FAILED events exactly (through
	// their partial indexes) and estimates SUCCESS events from the
	// planner's row count of the table (pg_class.reltuples, as of the
	// last ANALYZE or VACUUM), instead of counting every row: the
	// status of a table of millions of events then costs as much as
	// its backlog. Status.SuccessEstimated tells which was done.
	EstimateSuccess bool
}

// ReadStatusWith reads the status of table as o says.
func ReadStatusWith(ctx context.Context, db *sql.DB, table string, o StatusOptions) (*Status, error) {
	name, err := schema.ParseName(table)
	if err != nil {
		return nil, err
	}
	limit := cmp.Or(o.Limit, 10)
	t := name.Quoted()
	st := &Status{Table: name.String(), Counts: map[string]int{"READY": 0, "SUCCESS": 0, "FAILED": 0}}

	if o.EstimateSuccess {
		err = estimateCounts(ctx, db, name, st)
	} else {
		err = countAll(ctx, db, t, st)
	}
	if pqErr := (*pq.Error)(nil); errors.As(err, &pqErr) && pqErr.Code == "42P01" {
		return nil, fmt.Errorf("events table %s does not exist: run 'publisher migrate' first, or check --table and the database's search_path", name)
	}
	if err != nil {
		return nil, fmt.Errorf("count events: %w", err)
	}

	var age sql.NullFloat64
	if err := db.QueryRowContext(ctx, `SELECT extract(epoch FROM now() - min(created_at)),
			count(*) FILTER (WHERE attempts > 0)
		FROM `+t+` WHERE event_status = 'READY'`).Scan(&age, &st.Retrying); err != nil {
		return nil, fmt.Errorf("read backlog: %w", err)
	}
	if age.Valid {
		d := time.Duration(age.Float64 * float64(time.Second))
		st.OldestReadyAge = &d
	}

	// An entity is blocked by its first event that blocks in the claim's
	// sense: FAILED, or waiting for a retry that is not yet due.
	blocked := `WITH blockers AS (
			SELECT DISTINCT ON (entity_type, entity_id) entity_type, entity_id, event_id, seq,
				event_status, attempts, coalesce(last_error, ''), available_at
			FROM ` + t + ` e
			WHERE ` + blocksSQL("e") + `
			ORDER BY entity_type, entity_id, seq)
		SELECT b.*, (SELECT count(*) FROM ` + t + ` w
			WHERE w.entity_type = b.entity_type AND w.entity_id = b.entity_id
			  AND w.seq > b.seq AND w.event_status = 'READY'), count(*) OVER ()
		FROM blockers b ORDER BY b.seq LIMIT $1`
	rows, err := db.QueryContext(ctx, blocked, limit)
	if err != nil {
		return nil, fmt.Errorf("read blocked entities: %w", err)
	}
	for rows.Next() {
		var b BlockedEntity
		var seq int64
		if err := rows.Scan(&b.EntityType, &b.EntityID, &b.EventID, &seq, &b.Status, &b.Attempts,
			&b.LastError, &b.RetryAt, &b.Waiting, &st.BlockedTotal); err != nil {
			rows.Close()
			return nil, err
		}
		st.Blocked = append(st.Blocked, b)
	}
	rows.Close()

	rows, err = db.QueryContext(ctx, `SELECT event_id, event_target, entity_type, entity_id, attempts,
			coalesce(last_error, ''), created_at
		FROM `+t+` WHERE event_status = 'FAILED' ORDER BY seq DESC LIMIT $1`, limit)
	if err != nil {
		return nil, fmt.Errorf("read failed events: %w", err)
	}
	for rows.Next() {
		var f FailedEvent
		if err := rows.Scan(&f.EventID, &f.Subject, &f.EntityType, &f.EntityID, &f.Attempts, &f.LastError, &f.CreatedAt); err != nil {
			rows.Close()
			return nil, err
		}
		st.RecentFailed = append(st.RecentFailed, f)
	}
	rows.Close()

	var li LeaderInfo
	var addr sql.NullString
	err = db.QueryRowContext(ctx, `SELECT l.pid, host(a.client_addr), a.backend_start
		FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
		WHERE l.locktype = 'advisory' AND l.classid = $1::bigint::oid
		  AND l.objid = to_regclass($2)::oid AND l.objsubid = 2 AND l.granted
		  AND l.mode = 'ExclusiveLock'`,
		leaderNamespace, t).Scan(&li.PID, &addr, &li.BackendSince)
	switch {
	case errors.Is(err, sql.ErrNoRows):
	case err != nil:
		return nil, fmt.Errorf("read leader: %w", err)
	default:
		li.ClientAddr = addr.String
		st.Leader = &li
	}
	ps, err := readPause(ctx, db, name)
	if err != nil {
		return nil, err
	}
	st.Pause = PauseInfo{Paused: ps.Paused, By: ps.By}
	if !ps.At.IsZero() {
		st.Pause.At = &ps.At
	}
	if st.Replicas, err = readReplicas(ctx, db, name); err != nil {
		return nil, err
	}
	return st, nil
}

// countAll counts the events of table t (quoted) per status, reading
// every row.
func countAll(ctx context.Context, db *sql.DB, t string, st *Status) error {
	rows, err := db.QueryContext(ctx, `SELECT event_status, count(*) FROM `+t+` GROUP BY event_status`)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var s string
		var n int
		if err := rows.Scan(&s, &n); err != nil {
			return err
		}
		st.Counts[s] = n
	}
	return rows.Err()
}

// estimateCounts counts READY and FAILED events through the partial
// indexes that hold only them, and estimates SUCCESS events as the
// planner's row count of the table less those. A table never analyzed
// (reltuples -1) is counted exactly.
func estimateCounts(ctx context.Context, db *sql.DB, name schema.Name, st *Status) error {
	t := name.Quoted()
	var ready, failed int
	var total float64
	err := db.QueryRowContext(ctx, `SELECT
			(SELECT count(*) FROM `+t+` WHERE event_status = 'READY'),
			(SELECT count(*) FROM `+t+` WHERE event_status = 'FAILED'),
			(SELECT reltuples FROM pg_class WHERE oid = to_regclass($1))`, t).Scan(&ready, &failed, &total)
	if err != nil {
		return err
	}
	if total < 0 {
		return countAll(ctx, db, t, st)
	}
	st.Counts["READY"], st.Counts["FAILED"] = ready, failed
	st.Counts["SUCCESS"] = max(0, int(total)-ready-failed)
	st.SuccessEstimated = true
	return nil
}

// readReplicas lists the live partitioned publishers of the events table
// name (none before migration 0002).
func readReplicas(ctx context.Context, db *sql.DB, name schema.Name) ([]ReplicaInfo, error) {
	var exists bool
	if err := db.QueryRowContext(ctx, `SELECT to_regclass($1) IS NOT NULL`, name.Replicas().Quoted()).Scan(&exists); err != nil || !exists {
		return nil, err
	}
	rows, err := db.QueryContext(ctx, `SELECT r.replica_id, r.partitions, r.seen_at,
			coalesce(array_agg(l.part ORDER BY l.part) FILTER (WHERE l.expires_at > now()), '{}')
		FROM `+name.Replicas().Quoted()+` r LEFT JOIN `+name.Leases().Quoted()+` l ON l.owner = r.replica_id
		WHERE r.seen_at > now() - interval '1 minute'
		GROUP BY 1, 2, 3 ORDER BY 1`)
	if err != nil {
		return nil, fmt.Errorf("read replicas: %w", err)
	}
	defer rows.Close()
	var out []ReplicaInfo
	for rows.Next() {
		var r ReplicaInfo
		if err := rows.Scan(&r.ID, &r.Partitions, &r.SeenAt, (*pq.Int64Array)(&r.Held)); err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// RequeueFilter selects FAILED events to put back to READY. At most one of
// IDs, Entity (EntityType and EntityID) or All may be set; Since, Until and
// ErrorContains narrow the choice further and may be combined with each
// other and with IDs or Entity (all conditions must hold). A filter with
// no selector and no condition selects nothing and is an error.
type RequeueFilter struct {
	IDs        []string // event ids, as UUIDs in any spelling PostgreSQL reads
	EntityType string
	EntityID   string
	All        bool

	// Since and Until bound created_at: Since <= created_at < Until. The
	// zero time leaves that side open.
	Since, Until time.Time
	// ErrorContains selects events whose last_error contains this text,
	// ignoring case. It is matched literally: % and _ are not wildcards.
	ErrorContains string
}

// ErrNoSelector is returned by Requeue for a filter that selects nothing.
var ErrNoSelector = errors.New("choose events by id, by entity, by time range or error text, or all")

// where returns the SQL condition (after event_status = 'FAILED') and its
// arguments.
func (f RequeueFilter) where() (string, []any, error) {
	var (
		conds []string
		args  []any
	)
	arg := func(v any) string {
		args = append(args, v)
		return fmt.Sprintf("$%d", len(args))
	}
	selectors := 0
	if len(f.IDs) > 0 {
		selectors++
		conds = append(conds, `event_id = ANY(`+arg(pq.Array(f.IDs))+`::uuid[])`)
	}
	if f.EntityType != "" {
		selectors++
		conds = append(conds, `entity_type = `+arg(f.EntityType)+` AND entity_id = `+arg(f.EntityID))
	}
	if f.All {
		selectors++
	}
	filtered := false
	if !f.Since.IsZero() {
		filtered = true
		conds = append(conds, `created_at >= `+arg(f.Since))
	}
	if !f.Until.IsZero() {
		filtered = true
		conds = append(conds, `created_at < `+arg(f.Until))
	}
	if f.ErrorContains != "" {
		filtered = true
		conds = append(conds, `last_error ILIKE `+arg("%"+escapeLike(f.ErrorContains)+"%")+` ESCAPE '\'`)
	}
	switch {
	case selectors > 1:
		return "", nil, errors.New("choose events with at most one of ids, entity or all")
	case selectors == 0 && !filtered:
		return "", nil, ErrNoSelector
	case f.All && filtered:
		return "", nil, errors.New("all selects every FAILED event: drop it to filter by time range or error text")
	}
	w := `event_status = 'FAILED'`
	for _, c := range conds {
		w += ` AND ` + c
	}
	return w, args, nil
}

// escapeLike escapes s for a LIKE or ILIKE pattern with the escape
// character \, so that it matches itself: % and _ are not wildcards.
func escapeLike(s string) string {
	return strings.NewReplacer(`\`, `\\`, `%`, `\%`, `_`, `\_`).Replace(s)
}

// RequeueChunk is how many events Requeue moves per statement: it works
// through the events a filter selects in seq order, a chunk at a time,
// so requeueing thousands of events never holds their row locks together
// or stalls the publisher behind one long UPDATE.
const RequeueChunk = 1000

// Requeue moves the FAILED events that f selects back to READY with
// attempts reset, due now, and returns how many it moved (or, with dryRun,
// would move). It moves them in seq order, RequeueChunk at a time, each
// chunk its own statement: an error stops it with the earlier chunks
// moved, and their count returned. last_error is kept until the event is
// published. A filter that selects nothing returns an error wrapping
// ErrNoSelector.
func Requeue(ctx context.Context, db *sql.DB, table string, f RequeueFilter, dryRun bool) (int64, error) {
	name, err := schema.ParseName(table)
	if err != nil {
		return 0, err
	}
	where, args, err := f.where()
	if err != nil {
		return 0, fmt.Errorf("requeue: %w", err)
	}
	t := name.Quoted()
	if dryRun {
		var n int64
		if err := db.QueryRowContext(ctx, `SELECT count(*) FROM `+t+` WHERE `+where, args...).Scan(&n); err != nil {
			return 0, fmt.Errorf("count failed events: %w", err)
		}
		return n, nil
	}
	// The chunk is chosen first, then each row is moved only if it is
	// still FAILED when locked: a publisher or another requeue may have
	// changed it meanwhile.
	q := `WITH chunk AS (
			SELECT seq FROM ` + t + ` WHERE ` + where + fmt.Sprintf(` AND seq > $%d ORDER BY seq LIMIT $%d`, len(args)+1, len(args)+2) + `),
		moved AS (
			UPDATE ` + t + ` e SET event_status = 'READY', attempts = 0, available_at = now()
			FROM chunk WHERE e.seq = chunk.seq AND e.event_status = 'FAILED' RETURNING 1)
		SELECT (SELECT count(*) FROM moved), (SELECT max(seq) FROM chunk)`
	var total int64
	last := int64(0)
	for {
		var n int64
		var next sql.NullInt64
		if err := db.QueryRowContext(ctx, q, append(args, last, RequeueChunk)...).Scan(&n, &next); err != nil {
			return total, fmt.Errorf("requeue: %w", err)
		}
		total += n
		if n > 0 {
			// An UPDATE fires no insert trigger: wake the publisher directly.
			_, _ = db.ExecContext(ctx, `SELECT pg_notify('outbox_' || to_regclass($1)::oid::text, '')`, t)
		}
		if !next.Valid {
			return total, nil
		}
		last = next.Int64
	}
}
