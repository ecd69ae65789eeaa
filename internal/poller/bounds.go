package poller

import (
	"context"
	"database/sql"
	"fmt"
	"time"
)

// Bounds on every wait. A publisher frozen inside a transaction (SIGSTOP,
// a VM pause, a long GC pause) holds that transaction's locks; a publisher
// waiting for one of them stops publishing while it waits. So every
// transaction the loop opens first sets, in a statement of its own (a
// setting changed in the statement that waits does not apply to that
// wait; the claim sends that statement in the same round trip as the next
// one, claimBeginSQL), how long it may wait for a lock, run a statement and
// sit idle:
//
//	transaction  lock_timeout      statement_timeout  idle_in_transaction_session_timeout
//	claim        LeaderTimeout/5   none; idleInTx/2   idleInTx (it waits for acks)
//	                               with a batch
//	                               in flight
//	lease round  LeaderTimeout/5   LeaderTimeout      LeaderTimeout/2
//	leave        LeaderTimeout/5   LeaderTimeout      LeaderTimeout/2
//
// A claim or a lease round that times out is an error like any other: the
// claim backs the loop off, a failed lease round only postpones the next
// one (Run keeps publishing the leases held). The round's own lock is only
// tried (leases.go). The claim's statements have no statement_timeout: a
// claim over a large backlog blocked behind a FAILED event may take long,
// and a bound would fail it every time, so nothing would be published.
// lock_timeout bounds its waits for locks and
// idle_in_transaction_session_timeout ends it when its process freezes
// between statements; a statement running in PostgreSQL is not stalled by
// a frozen client (it runs to its end, then the transaction sits idle). The lock session (leader.go)
// sets session-wide bounds when it connects, before it takes any lock.
type txLimits struct {
	lock, statement, idle time.Duration // statement 0: no statement_timeout
}

// setLimitsSQL applies txLimits to the current transaction only.
const setLimitsSQL = `SELECT set_config('lock_timeout', $1, true),
	set_config('statement_timeout', $2, true),
	set_config('idle_in_transaction_session_timeout', $3, true)`

// args are the values of setLimitsSQL's parameters.
func (l txLimits) args() []any {
	statement := "0" // off, whatever the role or database sets
	if l.statement > 0 {
		statement = pgDuration(l.statement)
	}
	return []any{pgDuration(l.lock), statement, pgDuration(l.idle)}
}

// pgDuration formats d as a PostgreSQL time setting, at least 1 ms (0 would
// turn the bound off).
func pgDuration(d time.Duration) string {
	return fmt.Sprintf("%dms", max(1, d.Milliseconds()))
}

// claimLimits bound a claim transaction. It may sit idle while its batch
// waits for acks, so only idleInTx ends a frozen one. Its statements have
// no statement_timeout (see above), except while a batch is in flight
// (ahead): that batch's transaction sits idle until the claim ends, so the
// claim must end well before idleInTx would end it (pipelinedClaimMax). A
// pipelined claim that times out, or any claim that takes more than half of
// that, makes the loop stop pipelining (Poller.slowClaims) until a claim is
// quick again: slow claims then run one after the other, unbounded.
func (p *Poller) claimLimits(ahead bool) txLimits {
	l := txLimits{lock: p.lockWait(), idle: p.idleInTx()}
	if ahead {
		l.statement = p.pipelinedClaimMax()
	}
	return l
}

// pipelinedClaimMax is the statement_timeout of a claim made while a batch
// is in flight.
func (p *Poller) pipelinedClaimMax() time.Duration { return p.idleInTx() / 2 }

// leaseLimits bound a lease round or a leave: short statements, nothing to
// wait for in between, so a frozen one ends within LeaderTimeout/2.
func (p *Poller) leaseLimits() txLimits {
	return txLimits{lock: p.lockWait(), statement: p.cfg.LeaderTimeout, idle: p.cfg.LeaderTimeout / 2}
}

// lockWait is the longest a statement of the loop waits for a lock. Locks
// the loop contends for are held for milliseconds by a live publisher.
func (p *Poller) lockWait() time.Duration { return p.cfg.LeaderTimeout / 5 }

// readCommitted is the isolation level of every transaction the loop
// opens, whatever default_transaction_isolation the role or database sets.
// The claim and the lease round are written for it: each statement sees
// what committed before it, and a row locked or changed meanwhile is
// skipped or re-read rather than failing the transaction. Under a
// SERIALIZABLE default, a mark that met a writer's concurrent insert
// failed after its batch was sent, so the loop backed off and sent the
// batch again.
var readCommitted = &sql.TxOptions{Isolation: sql.LevelReadCommitted}

// beginLimited opens a transaction on the pool and applies limits to it.
func (p *Poller) beginLimited(ctx context.Context, limits txLimits) (*sql.Tx, error) {
	tx, err := p.db.BeginTx(ctx, readCommitted)
	if err != nil {
		return nil, err
	}
	if _, err := tx.ExecContext(ctx, setLimitsSQL, limits.args()...); err != nil {
		tx.Rollback() //nolint:errcheck
		return nil, err
	}
	return tx, nil
}
