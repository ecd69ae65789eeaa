package poller

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
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
}

func (r *row) entity() string { return r.entityType + "\x00" + r.entityID }

// queries holds the SQL of one events table, built once from its quoted name.
type queries struct {
	probe     string
	begin     string
	claim     string
	markDone  string
	markRetry string
}

// newQueries builds the claim and mark statements.
//
// Probe, before claiming: one statement without parameters (one round trip
// in the simple query protocol) that says whether any row is due, so an
// idle publisher's frequent polls stay cheap.
//
// Claim, in one transaction that stays open until the mark:
//
//  1. take the barrier key shared (see leader.go), bound how long the
//     transaction may sit idle, so a frozen leader's row locks expire, and
//     commit asynchronously: a mark lost in a database crash only means the
//     rows are sent again, which Nats-Msg-Id and pkg/dedup absorb;
//  2. select READY rows that are due, in seq order, skipping rows locked by
//     anyone else and rows whose entity has an earlier event that is FAILED
//     or waiting for a retry (attempts > 0, available_at in the future);
//     the fence makes the select empty when this process lost leadership.
//
// Mark, in the same transaction: acked rows become SUCCESS in one statement;
// each refused row gets attempts+1, last_error and a retry time in SQL time,
// or FAILED. Both carry the fence; a mark that matches fewer rows than it
// names means leadership was lost, and the transaction is rolled back.
func newQueries(table string) queries {
	// due selects rows e that may be published now.
	due := `e.event_status = 'READY' AND e.available_at <= now()
			  AND NOT EXISTS (
				SELECT 1 FROM ` + table + ` b
				WHERE b.entity_type = e.entity_type AND b.entity_id = e.entity_id AND b.seq < e.seq
				  AND (b.event_status = 'FAILED'
				       OR (b.event_status = 'READY' AND b.attempts > 0 AND b.available_at > now())))`
	return queries{
		begin: `SELECT pg_advisory_xact_lock_shared($1, $2::bigint::oid::int),
			set_config('idle_in_transaction_session_timeout', $3, true),
			set_config('synchronous_commit', 'off', true)`,
		probe: `SELECT EXISTS (SELECT 1 FROM ` + table + ` e WHERE ` + due + `)`,
		claim: `SELECT e.event_id, e.seq, e.event_target, e.event_type, e.entity_type, e.entity_id,
				e.event_data, e.headers, e.attempts, e.created_at
			FROM ` + table + ` e
			WHERE ` + due + `
			  AND ` + fenceSQL(2, 3, 4) + `
			ORDER BY e.seq
			LIMIT $1
			FOR UPDATE OF e SKIP LOCKED`,
		markDone: `UPDATE ` + table + `
			SET event_status = 'SUCCESS', published_at = now()
			WHERE event_id = ANY($1::uuid[]) AND event_status = 'READY' AND ` + fenceSQL(2, 3, 4),
		markRetry: `UPDATE ` + table + `
			SET attempts = attempts + 1,
			    last_error = $5,
			    event_status = CASE WHEN $6 OR attempts + 1 >= $7 THEN 'FAILED' ELSE 'READY' END,
			    available_at = now() + least($8::float8 * power(2, attempts), $9::float8) * interval '1 millisecond'
			WHERE event_id = $1::uuid AND event_status = 'READY' AND ` + fenceSQL(2, 3, 4),
	}
}

// claim opens the claim transaction and reads up to limit rows. The caller
// must end tx.
//
// When probe is set it first asks whether anything is due and opens no
// transaction when nothing is: cheap polling while idle. Under load, when
// the last claim found rows, the probe would only add a round trip.
func (p *Poller) claim(ctx context.Context, limit int, probe bool) (*sql.Tx, []row, error) {
	if probe {
		var due bool
		stmt, err := p.stmt(ctx, nil, p.q.probe)
		if err == nil {
			err = stmt.QueryRowContext(ctx).Scan(&due)
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
	tx, err := p.db.BeginTx(txCtx, nil)
	if !stop() && err == nil {
		tx.Rollback() //nolint:errcheck
		err = ctx.Err()
	}
	if err != nil {
		return nil, nil, fmt.Errorf("begin claim: %w", err)
	}
	idle := fmt.Sprintf("%dms", p.idleInTx().Milliseconds())
	begin, err := p.stmt(ctx, tx, p.q.begin)
	if err == nil {
		_, err = begin.ExecContext(ctx, barrierNamespace, p.tableOID, idle)
	}
	if err != nil {
		tx.Rollback() //nolint:errcheck
		return nil, nil, fmt.Errorf("begin claim: %w", err)
	}
	claim, err := p.stmt(ctx, tx, p.q.claim)
	if err != nil {
		tx.Rollback() //nolint:errcheck
		return nil, nil, fmt.Errorf("claim batch: %w", err)
	}
	rows, err := claim.QueryContext(ctx, limit, leaderNamespace, p.tableOID, p.lead.pid)
	if err != nil {
		tx.Rollback() //nolint:errcheck
		return nil, nil, fmt.Errorf("claim batch: %w", err)
	}
	out, err := scanRows(rows)
	if err != nil {
		tx.Rollback() //nolint:errcheck
		return nil, nil, fmt.Errorf("claim batch: %w", err)
	}
	return tx, out, nil
}

// stillLeads checks, in the claim transaction, that this process still
// holds the leader lock. A dead transaction counts as lost too.
func (p *Poller) stillLeads(ctx context.Context, tx *sql.Tx) error {
	var ok bool
	err := tx.QueryRowContext(ctx, `SELECT `+fenceSQL(1, 2, 3), leaderNamespace, p.tableOID, p.lead.pid).Scan(&ok)
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
	for rows.Next() {
		var r row
		if err := rows.Scan(&r.id, &r.seq, &r.subject, &r.eventType, &r.entityType, &r.entityID,
			&r.data, &r.headers, &r.attempts, &r.createdAt); err != nil {
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

// mark records the outcome of a batch in the claim transaction and commits.
func (p *Poller) mark(ctx context.Context, tx *sql.Tx, acked []string, refused []refusal) error {
	defer tx.Rollback() //nolint:errcheck // no-op after commit
	if len(acked) > 0 {
		done, err := p.stmt(ctx, tx, p.q.markDone)
		if err != nil {
			return fmt.Errorf("mark published: %w", err)
		}
		res, err := done.ExecContext(ctx, pq.Array(acked), leaderNamespace, p.tableOID, p.lead.pid)
		if err != nil {
			return fmt.Errorf("mark published: %w", err)
		}
		if n, _ := res.RowsAffected(); n != int64(len(acked)) {
			return fmt.Errorf("mark published: %d of %d rows: %w", n, len(acked), errLostLeadership)
		}
	}
	for _, r := range refused {
		res, err := tx.ExecContext(ctx, p.q.markRetry, r.id, leaderNamespace, p.tableOID, p.lead.pid,
			r.reason, r.permanent, p.cfg.MaxAttempts,
			float64(p.cfg.RetryBase.Milliseconds()), float64(p.cfg.RetryMax.Milliseconds()))
		if err != nil {
			return fmt.Errorf("mark refused: %w", err)
		}
		if n, _ := res.RowsAffected(); n != 1 {
			return fmt.Errorf("mark refused: %w", errLostLeadership)
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit batch: %w", err)
	}
	return nil
}

// userHeaders decodes a row's stored headers.
func (r *row) userHeaders() (map[string]string, error) {
	var h map[string]string
	if len(r.headers) == 0 {
		return nil, nil
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

// closeStmts releases the prepared statements.
func (p *Poller) closeStmts() {
	for q, s := range p.stmts {
		s.Close()
		delete(p.stmts, q)
	}
}
