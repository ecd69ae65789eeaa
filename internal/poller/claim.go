package poller

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/lib/pq"
)

// row is one claimed event.
type row struct {
	id         string
	seq        int64
	subject    string
	eventType  string
	entityType string
	entityID   string
	data       []byte
	headers    []byte
	attempts   int
	createdAt  time.Time
	held       bool // claimed but not to be sent: see newQueries, step 4
}

func (r *row) entity() string { return r.entityType + "\x00" + r.entityID }

// queries holds the SQL of one events table, built once from its quoted name.
type queries struct {
	probe      string
	claim      string
	markDone   string
	markRetry  string
	stillLeads string
}

// newQueries builds the claim and mark statements for the events table
// (quoted) in single-leader mode (partitions = 0) or partitioned mode, whose
// lease table is leases (quoted).
//
// Probe, before claiming: one statement that says whether any row is due,
// so an idle publisher's frequent polls stay cheap.
//
// Claim, in one transaction that stays open until the mark:
//
//  1. bound how long the transaction may wait for a lock and sit idle, so
//     a frozen leader's row locks expire (claimLimits, in a statement of its
//     own, before anything waits: bounds.go; claimBeginSQL);
//  2. take the barrier keys shared (see leader.go and leases.go) and commit
//     asynchronously: a mark lost in a database crash only means the rows
//     are sent again, which Nats-Msg-Id and pkg/dedup absorb. Steps 1 and 2
//     are two statements sent in one round trip;
//  3. lock READY rows that are due, in seq order, up to a number of rows,
//     skipping rows locked by anyone else (the batch in flight included),
//     rows whose entity has an earlier event that is FAILED or waiting for
//     a retry (attempts > 0, available_at in the future), and rows of the
//     entities held back by recent claims (see 4), with their size
//     (rowBytesSQL; an out-of-line payload is not read); keep of them the first, in
//     seq order, within a number of bytes (always at least one row); the
//     fence makes the select empty when this process lost leadership, and
//     in partitioned mode limits it to the partitions it leases. The budget
//     counts only rows this claim locked: rows locked by another session
//     (or by the batch in flight) never use it up. Rows locked but not kept
//     come after every kept row in seq order; they stay READY, unsent and
//     locked by this transaction until it ends, and count for the next
//     claims as rows locked by another session (see 4), so no later event
//     of their entity goes out ahead of them; the cost is that a pipelined
//     claim that meets one holds its entity back for HeldFor;
//  4. mark held, among the rows kept, every row that has an earlier
//     READY event of its entity which is neither kept by this claim
//     nor sent by this publisher in the batch still in flight (the
//     inflight seqs): a row locked by another session (an operator's
//     SELECT … FOR UPDATE, a long UPDATE, a migration) that SKIP LOCKED
//     passed over, a row of the batch in flight that was not sent, a row
//     not yet due. A held row is not sent; it stays locked, unsent and
//     unmarked, until this batch's transaction ends, and its entity is left
//     out of the next claims for a while (HeldFor) so that its rows do not
//     fill batch after batch. This is the rule of order: an event is sent
//     only when every earlier event of its entity is SUCCESS or was sent
//     ahead of it by this publisher, in seq order;
//  5. return the rows kept, in seq order, each with whether it is held.
//
// In SQL, with R the row limit, B the byte budget, F the inflight seqs
// and ok(e) the conditions of step 3 (due, not held back, fenced):
//
//	l = SELECT e.*, size FROM events e WHERE ok(e)
//	    ORDER BY seq LIMIT R FOR UPDATE SKIP LOCKED
//	c = SELECT * FROM (SELECT *, sum(size) OVER (ORDER BY seq) AS running FROM l)
//	    WHERE running <= B OR running = size
//	held(e) = EXISTS (SELECT 1 FROM events b
//	                  WHERE b.entity = e.entity AND b.seq < e.seq
//	                    AND b.event_status = 'READY'
//	                    AND b.seq NOT IN (SELECT seq FROM c)
//	                    AND b.seq <> ALL(F))
//	SELECT c.*, held(c) FROM c ORDER BY seq
//
// held is computed for all of c at once: the READY rows below c's last seq
// that are neither in c nor in F, grouped by entity, each entity's smallest
// seq (its rows in c after that seq are held). That reads the READY rows
// below the batch, which the select of step 3 has just read too: the rows
// skipped, blocked or held, and the batch in flight. A row of l not in c
// has a seq above all of c, so it holds nothing back in this claim.
//
// The READY rows below the batch are read in one range scan of the READY
// index; the test that a row's entity is among c's is a hash lookup (the
// IN is wrapped in coalesce so that PostgreSQL does not turn it into a
// join). As a join, on statistics that predate the backlog, the planner
// scanned that whole range once for each entity of c: 500 × 1,000 rows,
// 105 ms a batch, measured with 100,000 SUCCESS rows analyzed before a
// backlog of 5,000.
//
// The claim's statements run without a statement_timeout (claimLimits): a
// claim over a large blocked backlog may be slow, and a bound would make it
// fail every time, publishing nothing.
func newQueries(table, leases string, partitions int) queries {
	// due selects rows e that may be published now: the time is the
	// claim statement's, not its transaction's. now() is when the claim's
	// BEGIN ran, two round trips earlier, and an event committed meanwhile
	// (its available_at is its own transaction's start) is seen by the
	// statement yet was not due before it, so it waited for the next claim.
	due := `e.event_status = 'READY' AND e.available_at <= statement_timestamp()
			  AND NOT EXISTS (
				SELECT 1 FROM ` + table + ` b
				WHERE b.entity_type = e.entity_type AND b.entity_id = e.entity_id AND b.seq < e.seq
				  AND ` + blocksSQL("b") + `)`
	// ours is the condition that row e belongs to this publisher: always
	// in single-leader mode; in partitioned mode, its partition is leased,
	// and with live the lease has not expired. Its parameters are numbered
	// from n, as the fence's.
	ours := func(n int, live bool) string {
		if partitions == 0 {
			return `TRUE`
		}
		expiry := ""
		if live {
			expiry = " AND l.expires_at > statement_timestamp()"
		}
		return fmt.Sprintf(`%s = ANY(ARRAY(SELECT l.part FROM %s l
			WHERE l.owner = $%d AND l.partitions = %d AND l.part = ANY($%d::int[])%s))`,
			partitionSQL(partitions), leases, n+3, partitions, n+4, expiry)
	}
	// fence is the condition on row e, its parameters numbered from n:
	// this process holds the leader lock, and the row is ours.
	fence := func(n int, live bool) string {
		if partitions == 0 {
			return fenceSQL(n, n+1, n+2)
		}
		return fenceSQL(n, n+1, n+2) + ` AND ` + ours(n, live)
	}
	// notHeld leaves out the entities held back by recent claims ($4, $5:
	// their types and ids).
	notHeld := `NOT EXISTS (SELECT 1 FROM unnest($4::text[], $5::text[]) x(t, i)
				WHERE x.t = e.entity_type AND x.i = e.entity_id)`
	q := queries{
		probe: `SELECT EXISTS (SELECT 1 FROM ` + table + ` e WHERE ` + due + `)`,
		// The claim locks first, then keeps the rows the byte budget allows
		// among those it locked (a window function cannot share a SELECT
		// with FOR UPDATE). The rows locked are read whole: a payload
		// stored out of line stays a pointer until the rows kept are sent
		// (octet_length does not detoast either), and reading them again
		// by seq cost 500 index lookups a batch.
		claim: `WITH l AS MATERIALIZED (
			SELECT ` + claimColumns("e") + `, ` + rowBytesSQL("e") + ` AS size
			FROM ` + table + ` e
			WHERE ` + due + `
			  AND ` + notHeld + `
			  AND ` + fence(6, true) + `
			ORDER BY e.seq
			LIMIT $1
			FOR UPDATE OF e SKIP LOCKED),
		c AS MATERIALIZED (SELECT ` + claimColumns("s") + `
			FROM (SELECT l.*, sum(l.size) OVER (ORDER BY l.seq ROWS UNBOUNDED PRECEDING) AS running
				FROM l) s
			WHERE s.running <= $2 OR s.running = s.size),
		h AS MATERIALIZED (SELECT o.entity_type, o.entity_id, min(o.seq) AS first
			FROM ` + table + ` o
			WHERE o.event_status = 'READY' AND o.seq < (SELECT max(c.seq) FROM c)
			  AND o.seq NOT IN (SELECT c.seq FROM c)
			  AND o.seq NOT IN (SELECT unnest(coalesce($3::bigint[], '{}')))
			  AND coalesce((o.entity_type, o.entity_id) IN (SELECT c.entity_type, c.entity_id FROM c), false)
			GROUP BY o.entity_type, o.entity_id)
		SELECT ` + claimColumns("c") + `, coalesce(c.seq > h.first, false) AS held
		FROM c LEFT JOIN h ON h.entity_type = c.entity_type AND h.entity_id = c.entity_id
		ORDER BY c.seq`,
		markDone: `UPDATE ` + table + ` e
			SET event_status = 'SUCCESS', published_at = now()
			WHERE seq = ANY($1::bigint[]) AND event_status = 'READY' AND ` + fence(2, false),
		markRetry: `UPDATE ` + table + ` e
			SET attempts = attempts + 1,
			    last_error = $2,
			    event_status = CASE WHEN $3 OR attempts + 1 >= $4 THEN 'FAILED' ELSE 'READY' END,
			    available_at = statement_timestamp()
			        + least($5::float8 * power(2, least(attempts, 52)), $6::float8) * interval '1 millisecond'
			WHERE event_id = $1::uuid AND event_status = 'READY' AND ` + fence(7, false),
		stillLeads: `SELECT ` + fenceSQL(1, 2, 3),
	}
	if partitions > 0 {
		q.probe = `SELECT EXISTS (SELECT 1 FROM ` + table + ` e WHERE ` + due + `
			AND ` + partitionSQL(partitions) + ` = ANY($1::int[]))`
		q.stillLeads += fmt.Sprintf(` AND (SELECT count(*) FROM %s l
			WHERE l.owner = $4 AND l.partitions = %d AND l.part = ANY($5::int[])
			  AND l.expires_at > statement_timestamp()) = cardinality($5::int[])`, leases, partitions)
	}
	return q
}

// claimBeginSQL is steps 1 and 2 of the claim (see newQueries): two
// statements of the simple query protocol, sent in one round trip, so the
// bounds set by the first apply to the lock waits of the second. Every
// value is a number, written as a literal.
//
// It also turns JIT off for the transaction: a claim reads a few hundred
// rows and never gains from compiling its expressions, and the plans a
// claim may get on stale statistics cost enough to pass the JIT thresholds
// (a second or more of compiling a claim, measured). And it turns bitmap
// scans off: the claim is meant to walk the READY index in seq order and
// stop after a batch, and on statistics taken before the backlog (the
// READY rows a sliver of a table analyzed when it was mostly SUCCESS) the
// planner instead read every READY row through a bitmap and sorted them,
// for each batch: the cost of a batch grew with the backlog.
func claimBeginSQL(l txLimits, ns int, tableOID int64, parts []int) string {
	var b strings.Builder
	v := l.args() // durations as PostgreSQL reads them: digits and "ms"
	fmt.Fprintf(&b, `SELECT set_config('lock_timeout', '%s', true),
		set_config('statement_timeout', '%s', true),
		set_config('idle_in_transaction_session_timeout', '%s', true),
		set_config('jit', 'off', true),
		set_config('enable_bitmapscan', 'off', true);
		SELECT pg_advisory_xact_lock_shared(%d, %d::bigint::oid::int),
		set_config('synchronous_commit', 'off', true)`,
		v[0], v[1], v[2], ns, tableOID)
	for _, k := range parts {
		fmt.Fprintf(&b, `,
		pg_advisory_xact_lock_shared(%s)`, partitionKey(tableOID, k))
	}
	return b.String()
}

// claimColumns are the columns of a claimed row (scanRows), of the events
// row or claim CTE aliased alias.
func claimColumns(alias string) string {
	var b strings.Builder
	for i, c := range []string{"event_id", "seq", "event_target", "event_type", "entity_type", "entity_id",
		"event_data", "headers", "attempts", "created_at"} {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(alias + "." + c)
	}
	return b.String()
}

// rowBytesSQL is what a row of the events table aliased alias counts
// against the claim's byte budget: its payload and its stored headers, as
// stored (neither is decompressed to measure it).
func rowBytesSQL(alias string) string {
	return `(octet_length(` + alias + `.event_data) + coalesce(pg_column_size(` + alias + `.headers), 0))::bigint`
}

// blocksSQL is the condition under which the events row aliased alias
// blocks the later events of its entity: it is FAILED, or READY and
// waiting for a retry whose time has not come. A READY row whose retry is
// due blocks nothing: the claim takes it, in seq order, with the entity's
// later events. The claim, `publisher status` and the blocked-entities
// gauge all use this one condition, so they agree on what is blocked. It
// implies the predicate of the partial index on (entity_type, entity_id,
// seq), which serves it.
func blocksSQL(alias string) string {
	return `(` + alias + `.event_status = 'FAILED' OR (` + alias + `.event_status = 'READY' AND ` +
		alias + `.attempts > 0 AND ` + alias + `.available_at > now()))`
}

// fenceArgs are the values of the fence's parameters: the leader lock and
// the lock session's token, then in partitioned mode the replica id and the
// partitions held.
func (p *Poller) fenceArgs() []any {
	args := []any{leaderNamespace, p.tableOID, p.lead.token}
	if p.parts != nil {
		args = append(args, p.parts.id, pq.Array(p.parts.held))
	}
	return args
}

// claimBudget bounds a claim: at most rows rows, whose bytes (rowBytesSQL)
// stay within bytes, except that the first row claimed is always taken,
// however large. The rows of the batch still in flight, READY and locked
// by this process's other transaction, are skipped and count in neither.
type claimBudget struct {
	rows     int
	ahead    bool // a batch is in flight, its transaction idle meanwhile
	bytes    int64
	inflight []int64 // seqs of the rows the batch in flight sent
}

// claim opens the claim transaction and reads the rows b allows. The caller
// must end tx.
//
// When probe is set it first asks whether anything is due and opens no
// transaction when nothing is: cheap polling while idle. Under load, when
// the last claim found rows, the probe would only add a round trip.
func (p *Poller) claim(ctx context.Context, b claimBudget, probe bool) (*sql.Tx, []row, error) {
	var held []int
	if p.parts != nil {
		if held = p.parts.held; len(held) == 0 {
			return nil, nil, nil // no partition of ours to claim from
		}
	}
	if probe {
		var (
			due  bool
			args []any
		)
		if p.parts != nil {
			args = append(args, pq.Array(held))
		}
		stmt, err := p.stmt(ctx, nil, p.q.probe)
		if err == nil {
			err = stmt.QueryRowContext(ctx, args...).Scan(&due)
		}
		if err != nil {
			return nil, nil, fmt.Errorf("probe: %w", err)
		}
		if !due {
			return nil, nil, nil
		}
	}
	// Once begun, the transaction must outlive ctx: database/sql rolls a
	// transaction back when its BeginTx context ends, and a cancelled Run
	// still marks the batch it claimed. ctx only bounds the BEGIN itself.
	txCtx, cancelTx := context.WithCancel(context.WithoutCancel(ctx))
	stop := context.AfterFunc(ctx, cancelTx)
	tx, err := p.db.BeginTx(txCtx, readCommitted)
	if !stop() && err == nil {
		tx.Rollback() //nolint:errcheck
		err = ctx.Err()
	}
	if err != nil {
		return nil, nil, fmt.Errorf("begin claim: %w", err)
	}
	ns := barrierNamespace
	if p.parts != nil {
		ns = partsBarrierNamespace
	}
	if _, err = tx.ExecContext(ctx, claimBeginSQL(p.claimLimits(b.ahead), ns, p.tableOID, held)); err != nil {
		tx.Rollback() //nolint:errcheck
		return nil, nil, fmt.Errorf("begin claim: %w", err)
	}
	claim, err := p.stmt(ctx, tx, p.q.claim)
	if err != nil {
		tx.Rollback() //nolint:errcheck
		return nil, nil, fmt.Errorf("claim batch: %w", err)
	}
	heldTypes, heldIDs := p.heldBack()
	args := append([]any{b.rows, b.bytes, pq.Array(b.inflight),
		pq.Array(heldTypes), pq.Array(heldIDs)}, p.fenceArgs()...)
	claimStart := time.Now()
	rows, err := claim.QueryContext(ctx, args...)
	if err != nil {
		tx.Rollback() //nolint:errcheck
		if b.ahead && statementTimeout(err) {
			p.slowClaims = true
		}
		if replanned(err) {
			p.closeStmts()
		}
		return nil, nil, fmt.Errorf("claim batch: %w", err)
	}
	out, err := scanRows(rows)
	if err != nil {
		tx.Rollback() //nolint:errcheck
		return nil, nil, fmt.Errorf("claim batch: %w", err)
	}
	p.slowClaims = time.Since(claimStart) > p.pipelinedClaimMax()/2
	return tx, p.holdBack(out), nil
}

// HeldFor is how long the entity of a held row (see newQueries, step 4) is
// left out of the claims that follow: long enough that its rows do not
// fill every batch while an earlier event stays locked, short enough that
// it goes on soon after the lock is gone.
const HeldFor = time.Second

// holdBack returns rows without the held ones, and notes the held rows'
// entities, which the next claims leave out until HeldFor has passed. Held
// rows stay locked by the claim transaction, unsent, until it ends.
func (p *Poller) holdBack(rows []row) []row {
	out := rows[:0]
	for _, r := range rows {
		if !r.held {
			out = append(out, r)
			continue
		}
		if _, ok := p.held[r.entity()]; !ok {
			p.log.Info("event held back: an earlier event of its entity is neither published nor claimable (locked by another session, or not due)",
				"event_id", r.id, "seq", r.seq, "entity_type", r.entityType, "entity_id", r.entityID)
		}
		p.held[r.entity()] = heldEntity{typ: r.entityType, id: r.entityID, until: time.Now().Add(HeldFor)}
	}
	return out
}

// heldEntity is an entity the claims leave out until a time.
type heldEntity struct {
	typ, id string
	until   time.Time
}

// heldBack returns the types and ids of the entities still held back, and
// forgets the others.
func (p *Poller) heldBack() (types, ids []string) {
	now := time.Now()
	for k, h := range p.held {
		if now.After(h.until) {
			delete(p.held, k)
			continue
		}
		types, ids = append(types, h.typ), append(ids, h.id)
	}
	return types, ids
}

// stillLeads checks, in the claim transaction, that this process still
// holds the leader lock (and its leases). A dead transaction counts as lost
// too.
func (p *Poller) stillLeads(ctx context.Context, tx *sql.Tx) error {
	var ok bool
	err := tx.QueryRowContext(ctx, p.q.stillLeads, p.fenceArgs()...).Scan(&ok)
	switch {
	case err != nil:
		return fmt.Errorf("check leadership: %w", err)
	case !ok:
		return fmt.Errorf("check leadership before sending: %w", errLostLeadership)
	}
	return nil
}

// scanRows reads event rows selected in the column order of the claim,
// and closes rows.
func scanRows(rows *sql.Rows) ([]row, error) {
	defer rows.Close()
	var out []row
	cols, err := rows.Columns()
	if err != nil {
		return nil, err
	}
	for rows.Next() {
		var r row
		dest := []any{&r.id, &r.seq, &r.subject, &r.eventType, &r.entityType, &r.entityID,
			&r.data, &r.headers, &r.attempts, &r.createdAt}
		if len(cols) > len(dest) {
			dest = append(dest, &r.held) // the claim's
		}
		if err := rows.Scan(dest...); err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// refusal is a row JetStream (or the pre-flight check) refused.
type refusal struct {
	id        string
	reason    string
	permanent bool
	attempts  int // before this refusal
}

// markJob is a batch's mark, which records its outcome in the claim
// transaction and commits, ready to run: its statements and their
// arguments, taken from the Poller by the loop goroutine, so that run
// touches nothing of the Poller's and may run on another goroutine (see
// finish).
type markJob struct {
	tx       *sql.Tx
	done     *sql.Stmt // markDone, bound to tx; nil when nothing was acked
	doneArgs []any
	acked    int
	retry    string // markRetry
	retries  [][]any
}

// markJob prepares the mark of a batch: the rows published, found by seq
// (the claim's rows are in seq order, so the lookups walk the READY index
// forward; by event id, on statistics taken before a backlog, the planner
// compared every READY row with the ids), and each refused row.
func (p *Poller) markJob(ctx context.Context, tx *sql.Tx, acked []int64, refused []refusal) (*markJob, error) {
	m := &markJob{tx: tx, acked: len(acked), retry: p.q.markRetry}
	if len(acked) > 0 {
		done, err := p.stmt(ctx, tx, p.q.markDone)
		if err != nil {
			return nil, fmt.Errorf("mark published: %w", err)
		}
		m.done, m.doneArgs = done, append([]any{pq.Array(acked)}, p.fenceArgs()...)
	}
	for _, r := range refused {
		m.retries = append(m.retries, append([]any{r.id, r.reason, r.permanent, p.cfg.MaxAttempts,
			float64(p.cfg.RetryBase.Milliseconds()), float64(p.cfg.RetryMax.Milliseconds())}, p.fenceArgs()...))
	}
	return m, nil
}

// run executes the mark and commits, or rolls back on an error. It is safe
// to call from any goroutine, once.
func (m *markJob) run(ctx context.Context) error {
	defer m.tx.Rollback() //nolint:errcheck // no-op after commit
	if m.done != nil {
		res, err := m.done.ExecContext(ctx, m.doneArgs...)
		if err != nil {
			return fmt.Errorf("mark published: %w", err)
		}
		if n, _ := res.RowsAffected(); n != int64(m.acked) {
			return fmt.Errorf("mark published: %d of %d rows: %w", n, m.acked, errLostLeadership)
		}
	}
	for _, args := range m.retries {
		res, err := m.tx.ExecContext(ctx, m.retry, args...)
		if err != nil {
			return fmt.Errorf("mark refused: %w", err)
		}
		if n, _ := res.RowsAffected(); n != 1 {
			return fmt.Errorf("mark refused: %w", errLostLeadership)
		}
	}
	if err := m.tx.Commit(); err != nil {
		return fmt.Errorf("commit batch: %w", err)
	}
	return nil
}

// userHeaders decodes a row's stored headers.
func (r *row) userHeaders() (map[string]string, error) {
	var h map[string]string
	if len(r.headers) == 0 || string(r.headers) == "{}" {
		return nil, nil // most events carry none: skip the decoder
	}
	if err := json.Unmarshal(r.headers, &h); err != nil {
		return nil, fmt.Errorf("headers: %w", err)
	}
	return h, nil
}

// stmt returns query prepared (once per pool connection, by database/sql),
// bound to tx when tx is not nil. Prepared statements save a round trip and
// the planning of each claim and mark. Only the loop goroutine calls it.
func (p *Poller) stmt(ctx context.Context, tx *sql.Tx, query string) (*sql.Stmt, error) {
	s, ok := p.stmts[query]
	if !ok {
		var err error
		if s, err = p.db.PrepareContext(ctx, query); err != nil {
			return nil, err
		}
		p.stmts[query] = s
	}
	if tx != nil {
		return tx.StmtContext(ctx, s), nil
	}
	return s, nil
}

// statementTimeout reports whether err is PostgreSQL cancelling a
// statement at its statement_timeout.
func statementTimeout(err error) bool {
	var pe *pq.Error
	return errors.As(err, &pe) && pe.Code == "57014"
}

// replanned reports whether err is PostgreSQL refusing a prepared
// statement because the type of a column it returns changed since it was
// prepared (a migration such as 0003 altered the table meanwhile). The
// statement then fails on that connection every time, so the loop would
// back off forever; closing the prepared statements makes the next claim
// prepare them again, for the table as it is now.
func replanned(err error) bool {
	var pe *pq.Error
	return errors.As(err, &pe) && pe.Code == "0A000" &&
		strings.Contains(pe.Message, "cached plan must not change result type")
}

// closeStmts releases the prepared statements. Statements bound to a
// transaction still open stay usable until it ends.
func (p *Poller) closeStmts() {
	for q, s := range p.stmts {
		s.Close()
		delete(p.stmts, q)
	}
}
