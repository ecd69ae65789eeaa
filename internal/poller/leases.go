package poller

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"time"

	"github.com/lib/pq"
)

// Partition leases: several active publishers per events table
// (Config.Partitions = P > 0), each publishing the entities of its share of
// the partitions. An entity's partition is a hash of its type and id modulo
// P, so all its events go through one publisher at a time, in seq order.
//
// Tables (schema migration 0002): <events>_replicas has a row per publisher,
// refreshed by its heartbeat; <events>_leases has a row per partition taken:
// owner, partition count and expiry, all in database time.
//
// Advisory locks, each keyed by the events table's oid:
//
//	leaderKey        a partitioned publisher holds it shared on its lock
//	                 session for as long as it takes part; a single leader
//	                 holds it exclusive. So the two modes never publish at
//	                 once, and every claim and mark checks it (fenceSQL).
//	barrierKey       single-leader claims take it shared; a partitioned
//	                 publisher takes it exclusive once on joining, which
//	                 waits out the claims of a single leader before it.
//	partsBarrierKey  partitioned claims take it shared; a single leader
//	                 takes it exclusive once on election, and so does a
//	                 publisher clearing leases of another partition count.
//	partitionKey(p)  partitioned claims take it shared for each partition
//	                 they may claim from; a new owner of p takes it
//	                 exclusive once (trying, never waiting) before claiming.
//
// A partition, as one publisher sees it:
//
//	free     --lease row inserted, or an expired row taken-->   pending
//	free     --an unexpired row already names this id-->        pending
//	pending  --pg_try_advisory_xact_lock(partitionKey(p))-->    held
//	held, pending --outside this publisher's share-->           free (row deleted,
//	                                                            after the batch in flight is marked)
//	held, pending --row expired, or taken by another-->         free
//
// Claims read only held partitions whose lease row still names this
// publisher and has not expired at statement time; marks require the row to
// still name it. A publisher that stalled past its lease claims nothing more
// from it, and the barrier keeps the next owner from claiming until the
// stalled publisher's claim transaction has ended. So no owner skips an
// entity's event still locked by its predecessor and publishes a later one.
//
// The heartbeat (leader.go) renews this publisher's unexpired leases and its
// replica row every LeaderTimeout/5; a lease lasts LeaderTimeout. Renewal
// never revives an expired lease: that one goes through the barrier again.
//
// Rebalancing, run by the loop every LeaderTimeout/5:
//
//  1. read the live replicas with this partition count, sorted by id; this
//     publisher's share is every p with p mod n = its index;
//  2. if it holds partitions outside its share, finish the batch in flight;
//  3. in one transaction, serialised between publishers by an advisory
//     transaction lock (tried: a round that finds it held is postponed)
//     and fenced on the lock session: upsert its replica row, delete replicas unseen for
//     a lease time, delete its leases outside its share, take the leases
//     of its share that are free or expired;
//  4. try the barrier of each pending partition.
//
// A round that fails (a peer frozen while it holds the round's lock, say,
// which PostgreSQL ends within LeaderTimeout/2: bounds.go) is logged and
// tried again after a growing pause, up to a lease time; meanwhile the loop
// goes on publishing the leases it holds, which the heartbeat keeps
// renewing.
//
// A joining publisher has its share within two rounds, once the others have
// seen it and let go. The share of a publisher that stops is taken within a
// round; of one that dies, once its leases expire.
//
// Publishers that disagree on P would hash an entity to different
// partitions. A publisher takes no lease while an unexpired lease of another
// count exists; once only expired ones remain, it waits for partsBarrierKey
// (every claim made under them has ended) and deletes them.
const (
	partsBarrierNamespace = 0x6f627834 // "obx4"
	rebalanceNamespace    = 0x6f627835 // "obx5"
	// partitionKeyTag fills bits 16-31 of a partition's lock key: the
	// table oid, this tag and the partition number.
	partitionKeyTag = 0x6f62
	// MaxPartitions is the largest partition count.
	MaxPartitions = 4096
)

// errRoundBusy: another publisher's lease round holds the round's lock.
var errRoundBusy = errors.New("rebalance: another publisher's lease round holds the lock")

// partitionKeySQL is the bigint advisory-lock key of partition k of the
// table whose oid is parameter $oidParam.
func partitionKeySQL(oidParam int, k string) string {
	return fmt.Sprintf(`(($%d::bigint << 32) | %d | %s)`, oidParam, partitionKeyTag<<16, k)
}

// partitionKey is partitionKeySQL's key of partition k of the table whose
// oid is tableOID, as a literal.
func partitionKey(tableOID int64, k int) string {
	return fmt.Sprintf(`%d`, tableOID<<32|partitionKeyTag<<16|int64(k))
}

// partitionSQL is the partition of the entity of row alias e, out of count.
func partitionSQL(count int) string {
	return fmt.Sprintf(`(((hashtextextended(e.entity_type || '/' || e.entity_id, 0) %% %[1]d) + %[1]d) %% %[1]d)::int`, count)
}

// partitions is the lease state of a partitioned publisher. Only the loop
// goroutine uses it.
type partitions struct {
	count    int
	id       string // this publisher's replica id
	leases   string // quoted table names
	replicas string
	held     []int // sorted; what claims may read
	pending  []int // leased, barrier not passed yet
	next     time.Time
	retry    backoff // between failed rounds
	conflict bool    // another partition count holds leases; logged
}

// defaultReplicaID names a publisher process: host, pid and a random
// suffix, so a restarted process is a new replica.
func defaultReplicaID() string {
	host, _ := os.Hostname()
	return fmt.Sprintf("%s-%d-%s", host, os.Getpid(), strconv.FormatInt(time.Now().UnixNano()%46656, 36))
}

// leaseTTL is how long a lease or a replica row lasts without a heartbeat.
func (p *Poller) leaseTTL() time.Duration { return p.cfg.LeaderTimeout }

// renewSQL renews this publisher's replica row and unexpired leases; the
// heartbeat runs it with (replica id, lease time in ms). It never waits for
// a row lock, so it cannot deadlock with a lease round (which locks rows in
// its own order): a row that is locked now is renewed at the next beat.
func (pt *partitions) renewSQL() string {
	return `WITH seen AS (
			UPDATE ` + pt.replicas + ` SET seen_at = now()
			WHERE replica_id IN (SELECT replica_id FROM ` + pt.replicas + `
				WHERE replica_id = $1 FOR UPDATE SKIP LOCKED))
		UPDATE ` + pt.leases + ` SET expires_at = now() + $2 * interval '1 millisecond'
		WHERE part IN (SELECT part FROM ` + pt.leases + `
			WHERE owner = $1 AND expires_at > now() FOR UPDATE SKIP LOCKED)`
}

// share is the partitions of the replica at index i of n.
func share(count, i, n int) []int {
	var out []int
	for k := i; k < count; k += n {
		out = append(out, k)
	}
	return out
}

// rebalance runs one round of the lease protocol (see above).
func (p *Poller) rebalance(ctx context.Context) error {
	pt := p.parts
	pt.next = time.Now().Add(p.cfg.LeaderTimeout / 5)
	live, err := column[string](ctx, p.db, `SELECT replica_id FROM `+pt.replicas+`
		WHERE partitions = $1 AND seen_at > now() - $2 * interval '1 millisecond'`,
		pt.count, p.leaseTTL().Milliseconds())
	if err != nil {
		return fmt.Errorf("read replicas: %w", err)
	}
	if !slices.Contains(live, pt.id) {
		live = append(live, pt.id)
	}
	slices.Sort(live)
	want := share(pt.count, slices.Index(live, pt.id), len(live))
	outside := func(k int) bool { return !slices.Contains(want, k) }
	if slices.ContainsFunc(pt.held, outside) || slices.ContainsFunc(pt.pending, outside) {
		if err := p.drain(ctx); err != nil {
			return err
		}
	}

	// Bounded (bounds.go): a round frozen while it holds the round's lock
	// ends within LeaderTimeout/2.
	tx, err := p.beginLimited(ctx, p.leaseLimits())
	if err != nil {
		return fmt.Errorf("rebalance: %w", err)
	}
	defer tx.Rollback() //nolint:errcheck // no-op after commit
	// The fence keeps a process that lost its lock session (frozen, then
	// resumed) from writing lease rows in the name of its replica id, which
	// a new process may be using by now.
	// The round's lock is tried, never waited for: a live peer holds it
	// for milliseconds, a frozen one for up to LeaderTimeout/2, and a loop
	// waiting here would not finish its batch in flight meanwhile.
	var locked, leads bool
	if err := tx.QueryRowContext(ctx, `SELECT pg_try_advisory_xact_lock($4, $2::bigint::oid::int), `+fenceSQL(1, 2, 3),
		leaderNamespace, p.tableOID, p.lead.token, rebalanceNamespace).Scan(&locked, &leads); err != nil {
		return fmt.Errorf("rebalance: lock: %w", err)
	}
	switch {
	case !leads:
		return fmt.Errorf("rebalance: %w", errLostLeadership)
	case !locked:
		return errRoundBusy
	}
	ttl := p.leaseTTL().Milliseconds()
	steps := []struct {
		what, sql string
		args      []any
	}{
		{"register", `INSERT INTO ` + pt.replicas + ` (replica_id, partitions) VALUES ($1, $2)
			ON CONFLICT (replica_id) DO UPDATE SET partitions = excluded.partitions, seen_at = now()`,
			[]any{pt.id, pt.count}},
		{"forget gone replicas", `DELETE FROM ` + pt.replicas + ` WHERE seen_at < now() - $1 * interval '1 millisecond'`,
			[]any{ttl}},
	}
	for _, s := range steps {
		if _, err := tx.ExecContext(ctx, s.sql, s.args...); err != nil {
			return fmt.Errorf("rebalance: %s: %w", s.what, err)
		}
	}
	if want, err = p.checkCount(ctx, tx, want); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM `+pt.leases+` WHERE owner = $1 AND NOT part = ANY($2::int[])`,
		pt.id, pq.Array(want)); err != nil {
		return fmt.Errorf("rebalance: release: %w", err)
	}
	valid, err := column[int](ctx, tx, `SELECT part FROM `+pt.leases+` WHERE owner = $1 AND expires_at > now()`, pt.id)
	if err != nil {
		return fmt.Errorf("rebalance: read leases: %w", err)
	}
	// Take free and expired leases of the share. Neither statement locks a
	// row another replica's heartbeat may be renewing: the UPDATE matches
	// expired rows only, which renewal never touches, and DO NOTHING takes
	// no row lock.
	taken, err := column[int](ctx, tx, `WITH expired AS (
			UPDATE `+pt.leases+` SET partitions = $2, owner = $3,
				expires_at = now() + $4 * interval '1 millisecond', acquired_at = now()
			WHERE part = ANY($1::int[]) AND expires_at <= now()
			RETURNING part),
		free AS (
			INSERT INTO `+pt.leases+` (part, partitions, owner, expires_at)
			SELECT k, $2, $3, now() + $4 * interval '1 millisecond' FROM unnest($1::int[]) k
			ON CONFLICT (part) DO NOTHING
			RETURNING part)
		SELECT part FROM expired UNION ALL SELECT part FROM free`, pq.Array(want), pt.count, pt.id, ttl)
	if err != nil {
		return fmt.Errorf("rebalance: take leases: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("rebalance: commit: %w", err)
	}

	inValid := func(k int) bool { return !slices.Contains(valid, k) }
	held := slices.DeleteFunc(slices.Clone(pt.held), inValid)
	// Every valid lease not held goes through the barrier, not only those
	// pending here: a lease this replica id took in an earlier life (a
	// process restarted under the same id before its leases expired, or a
	// round that failed after its commit) is renewed by the heartbeat and
	// would otherwise never be claimed from.
	pending := append(slices.DeleteFunc(slices.Clone(valid), func(k int) bool { return slices.Contains(held, k) }), taken...)
	var passed []int
	if len(pending) > 0 {
		// A statement outside a transaction: each lock taken is released
		// at its end, once it has proved no claim holds it shared.
		passed, err = column[int](ctx, p.db, `SELECT k FROM unnest($2::int[]) k
			WHERE pg_try_advisory_xact_lock(`+partitionKeySQL(1, "k")+`)`, p.tableOID, pq.Array(pending))
		if err != nil {
			return fmt.Errorf("rebalance: partition barrier: %w", err)
		}
	}
	held = append(held, passed...)
	pending = slices.DeleteFunc(pending, func(k int) bool { return slices.Contains(passed, k) })
	slices.Sort(held)
	slices.Sort(pending)
	if !slices.Equal(held, pt.held) || !slices.Equal(pending, pt.pending) {
		p.log.Info("partitions rebalanced", "held", fmt.Sprint(held), "waiting", fmt.Sprint(pending),
			"replicas", len(live), "replica_id", pt.id)
	}
	pt.held, pt.pending = held, pending
	p.heldCount.Store(int64(len(held)))
	p.cfg.Metrics.partitionsHeld(len(held))
	return nil
}

// checkCount returns want, or nothing while a lease of another partition
// count is unexpired. Expired leases of another count are deleted once
// every claim made under them has ended.
func (p *Poller) checkCount(ctx context.Context, tx *sql.Tx, want []int) ([]int, error) {
	pt := p.parts
	var live, all int
	if err := tx.QueryRowContext(ctx, `SELECT count(*) FILTER (WHERE expires_at > now()), count(*)
		FROM `+pt.leases+` WHERE partitions <> $1`, pt.count).Scan(&live, &all); err != nil {
		return nil, fmt.Errorf("rebalance: check partition counts: %w", err)
	}
	switch {
	case live > 0:
		if !pt.conflict {
			p.log.Error("publishers with another --partitions value hold leases; taking none until they stop",
				"partitions", pt.count)
			pt.conflict = true
		}
		return nil, nil
	case all > 0:
		if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock($1, $2::bigint::oid::int)`,
			partsBarrierNamespace, p.tableOID); err != nil {
			return nil, fmt.Errorf("rebalance: wait for claims under another partition count: %w", err)
		}
		if _, err := tx.ExecContext(ctx, `DELETE FROM `+pt.leases+` WHERE partitions <> $1`, pt.count); err != nil {
			return nil, fmt.Errorf("rebalance: clear leases of another partition count: %w", err)
		}
		p.log.Warn("cleared expired leases of another partition count", "partitions", pt.count)
	}
	pt.conflict = false
	return want, nil
}

// leave deletes this publisher's leases and replica row, so the others take
// its share at their next round instead of when its leases expire.
func (p *Poller) leave(ctx context.Context) {
	pt := p.parts
	pt.held, pt.pending = nil, nil
	p.heldCount.Store(0)
	p.cfg.Metrics.partitionsHeld(0)
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), p.cfg.LeaderTimeout)
	defer cancel()
	err := func() error {
		tx, err := p.beginLimited(ctx, p.leaseLimits())
		if err != nil {
			return err
		}
		defer tx.Rollback() //nolint:errcheck // no-op after commit
		// Fenced: after its lock session died, the rows may be another
		// process's under the same id by now; they expire on their own.
		if _, err := tx.ExecContext(ctx, `WITH gone AS (DELETE FROM `+pt.replicas+` WHERE replica_id = $1 AND `+fenceSQL(2, 3, 4)+`)
			DELETE FROM `+pt.leases+` WHERE owner = $1 AND `+fenceSQL(2, 3, 4),
			pt.id, leaderNamespace, p.tableOID, p.lead.token); err != nil {
			return err
		}
		return tx.Commit()
	}()
	if err != nil {
		p.log.Warn("release leases; they expire on their own", "err", err)
	}
}

// querier is a *sql.DB or a *sql.Tx.
type querier interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
}

// column runs a query returning one column and returns its values.
func column[T any](ctx context.Context, q querier, query string, args ...any) ([]T, error) {
	rows, err := q.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []T
	for rows.Next() {
		var v T
		if err := rows.Scan(&v); err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}
