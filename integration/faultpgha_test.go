//go:build faults

package integration

import (
	"context"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
	"github.com/pgnats/outbox/schema"
)

// pgPair is a primary and a streaming standby the test owns: the standby is
// a pg_basebackup -R of the primary, so it streams from it and can be
// promoted when the primary dies.
type pgPair struct {
	primary, standby *pgCluster
	anyHost          bool // DSN leaves out target_session_attrs
}

// startPGPair starts a primary and a standby streaming from it. With sync,
// the primary waits for the standby's flush before it reports a commit
// (synchronous_standby_names '*', synchronous_commit on); without, the
// standby replays in the background (asynchronous replication).
func startPGPair(t *testing.T, sync bool) *pgPair {
	t.Helper()
	pr := newPGCluster(t)
	pr.initdb()
	pr.start()
	sb := newPGCluster(t)
	if out, err := sb.run("pg_basebackup", "-D", sb.data(), "-R", "-X", "stream", "-c", "fast", "--no-sync",
		"-h", "127.0.0.1", "-p", fmt.Sprint(pr.port), "-U", "postgres"); err != nil {
		t.Fatalf("pg_basebackup: %v\n%s", err, out)
	}
	sb.start()
	admin, err := sqlx.Open("postgres", pr.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	state := "async"
	if sync {
		state = "sync"
		// Set once the standby streams: before, every commit would wait.
		if _, err := admin.Exec(`ALTER SYSTEM SET synchronous_standby_names = '*'`); err != nil {
			t.Fatal(err)
		}
		if _, err := admin.Exec(`SELECT pg_reload_conf()`); err != nil {
			t.Fatal(err)
		}
	}
	if !waitFor(30*time.Second, func() bool {
		var n int
		_ = admin.Get(&n, `SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND sync_state = $1`, state)
		return n == 1
	}) {
		log, _ := os.ReadFile(sb.log())
		t.Fatalf("the standby does not stream (%s) from the primary:\n%s", state, log)
	}
	return &pgPair{primary: pr, standby: sb}
}

// DSN is a multi-host key=value DSN naming the primary then the standby,
// with target_session_attrs=read-write: a connection goes to whichever
// accepts writes, so clients follow a promotion by reconnecting. Without
// p.anyHost the attribute is left out, as a misconfigured client would:
// a connection then goes to the first server that answers, a standby too.
func (p *pgPair) DSN() string {
	dsn := fmt.Sprintf("host=127.0.0.1,127.0.0.1 port=%d,%d user=postgres dbname=postgres sslmode=disable connect_timeout=3",
		p.primary.port, p.standby.port)
	if !p.anyHost {
		dsn += " target_session_attrs=read-write"
	}
	return dsn
}

// freezeSender SIGSTOPs the primary's WAL sender, so that the standby
// falls behind, and returns its pid.
func (p *pgPair) freezeSender(t *testing.T) int {
	t.Helper()
	admin, err := sqlx.Open("postgres", p.primary.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	var pid int
	if err := admin.Get(&pid, `SELECT pid FROM pg_stat_replication`); err != nil {
		t.Fatalf("find the WAL sender: %v", err)
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatalf("freeze the WAL sender: %v", err)
	}
	return pid
}

// newDB creates a schema on the primary, migrates the outbox tables and
// fault_business into it, and returns it opened through the multi-host DSN.
func (p *pgPair) newDB(t *testing.T) *testenv.DB {
	t.Helper()
	name := "t_" + testenv.Suffix()
	dsn := schema.WithSearchPath(p.DSN(), name)
	db, err := sqlx.Open("postgres", dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	if _, err := db.Exec(`CREATE SCHEMA ` + name); err != nil {
		t.Fatalf("create schema on the primary: %v", err)
	}
	if _, err := schema.Migrate(context.Background(), db.DB, schema.Tables{}); err != nil {
		t.Fatalf("migrate the primary: %v", err)
	}
	if _, err := db.Exec(`CREATE TABLE ` + name + `.fault_business (event_id uuid PRIMARY KEY, entity text NOT NULL, n int NOT NULL)`); err != nil {
		t.Fatalf("create fault_business: %v", err)
	}
	return &testenv.DB{DB: db, DSN: dsn, Schema: name}
}

// insertBusiness inserts the service's own change of each event, in the
// events' transaction.
func insertBusiness(ctx context.Context, tx *sqlx.Tx, ids []string, events []outbox.Event) error {
	entities := make([]string, len(events))
	ns := make([]int64, len(events))
	for i, ev := range events {
		p := ev.Data.(payload)
		entities[i], ns[i] = p.Entity, int64(p.N)
	}
	_, err := tx.ExecContext(ctx, `INSERT INTO fault_business (event_id, entity, n)
		SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[])`, pq.Array(ids), pq.Array(entities), pq.Array(ns))
	return err
}

// pairCheck is what forgetGone found on the new primary.
type pairCheck struct {
	goneCommitted int // events of commits the writers saw succeed, absent with their business rows
	goneUnknown   int // events of commits that returned an error, absent with their business rows
	landed        int // events of commits that returned an error, present
	broken        int // events of the ledger present without their business row, or the reverse
	orphanEvents  int // event rows without a business row, all of the table
	orphanRows    int // business rows without an event row
}

// forgetGone asks db (the new primary, after a failover) which events of
// the ledger that may have committed exist, and their business rows. An
// event present with its row is committed (an unknown commit that landed);
// one absent with its row was lost in the failover: it is marked gone and
// is neither counted lost nor, if delivered, unexpected. An event without
// its row, or the reverse, is a broken pair. Call it before settle.
func (l *faultLedger) forgetGone(db *sqlx.DB, timeout time.Duration) (pairCheck, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var ids []string
	for _, e := range l.entries {
		if e.committed || e.unknown {
			ids = append(ids, e.id)
		}
	}
	var (
		c          pairCheck
		events, bs []string
		err        error
	)
	waitFor(timeout, func() bool {
		events, bs = nil, nil
		err = db.Select(&events, `SELECT event_id::text FROM events WHERE event_id = ANY($1::uuid[])`, pq.Array(ids))
		if err == nil {
			err = db.Select(&bs, `SELECT event_id::text FROM fault_business WHERE event_id = ANY($1::uuid[])`, pq.Array(ids))
		}
		if err == nil {
			err = db.QueryRow(`SELECT
				(SELECT count(*) FROM events e WHERE NOT EXISTS (SELECT 1 FROM fault_business b WHERE b.event_id = e.event_id)),
				(SELECT count(*) FROM fault_business b WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = b.event_id))`).
				Scan(&c.orphanEvents, &c.orphanRows)
		}
		return err == nil
	})
	if err != nil {
		return c, fmt.Errorf("check events and business rows on the new primary: %w", err)
	}
	hasEvent, hasRow := map[string]bool{}, map[string]bool{}
	for _, id := range events {
		hasEvent[id] = true
	}
	for _, id := range bs {
		hasRow[id] = true
	}
	for _, id := range ids {
		e := l.entries[id]
		switch {
		case hasEvent[id] != hasRow[id]:
			c.broken++
		case hasEvent[id]:
			if e.unknown {
				c.landed++
			}
			e.committed, e.unknown = true, false
		case e.unknown:
			c.goneUnknown++
			e.gone, e.committed, e.unknown = true, false, false
		default:
			c.goneCommitted++
			e.gone, e.committed = true, false
		}
	}
	return c, nil
}

// faultPGFailover: writers (each transaction an event per business row)
// and the publisher connect with the pair's multi-host DSN; the primary is
// killed (pg_ctl stop -m immediate) under writes and the standby promoted.
// The consumer keeps its dedup table in a database of its own, as a
// separate service would. With sync, nothing the writers saw committed may
// be lost; without, what the failover lost must be lost whole: the event
// with its business row.
//
// With anyHost the DSN lacks target_session_attrs, so that clients reach
// the standby while it is read-only: the publisher must not lead there.
func faultPGFailover(sync, anyHost bool) func(t *testing.T) faultRow {
	return func(t *testing.T) faultRow {
		pair := startPGPair(t, sync)
		pair.anyHost = anyHost
		_, js := testenv.NATS(t)
		st, prefix := testenv.Stream(t, js)
		w, err := outbox.NewWriter(outbox.Config{})
		if err != nil {
			t.Fatal(err)
		}
		b := &bundle{db: pair.newDB(t), fx: testenv.NewDB(t), js: js, stream: st.CachedInfo().Config.Name, prefix: prefix, w: w}
		l := newFaultLedger()
		c := startFaultConsumer(t, b, testenv.NATSURL(), b.stream, 0)
		// Some transactions wait before COMMIT, so that some are open when
		// the primary dies and their COMMIT errors (unknown outcome).
		load := steadyLoad
		load.latePct, load.lateFor, load.business = 5, 300*time.Millisecond, true
		fw := startFaultWriters(t, b, l, load)
		p := startFaultPublisher(t, "publisher", b.db.DSN, metricsFlags...)
		p.WaitLog(t, logLeaderElected, 15*time.Second)
		base := httpBase(t, p)
		pause(5 * time.Second)

		// Asynchronous: the standby falls 2 s behind (the primary's WAL
		// sender frozen) before the primary dies, so that the failover
		// loses the commits of those 2 s, as it does when a standby lags.
		sender := 0
		if !sync {
			sender = pair.freezeSender(t)
			pause(2 * time.Second)
		}
		elected := strings.Count(p.Logs(), logLeaderElected)
		stopped := make(chan error, 1)
		go func() {
			out, err := pair.primary.run("pg_ctl", "stop", "-D", pair.primary.data(), "-m", "immediate", "-w", "-t", "20")
			if err != nil {
				err = fmt.Errorf("%w\n%s", err, out)
			}
			stopped <- err
		}()
		if sender != 0 {
			// Let the frozen sender take the shutdown's SIGQUIT, which it
			// acts on first when it runs again: it sends nothing more.
			time.Sleep(200 * time.Millisecond)
			_ = syscall.Kill(sender, syscall.SIGCONT)
		}
		if err := <-stopped; err != nil {
			t.Fatalf("kill the primary: %v", err)
		}
		// 3 s without a primary, as a failover manager takes to decide:
		// the standby answers, read-only, and the publisher must not lead
		// on it.
		pause(3 * time.Second)
		ledOnStandby := strings.Count(p.Logs(), logLeaderElected) > elected
		refused := strings.Count(p.Logs(), "read-only standby (in recovery)")
		promoting := time.Now()
		if out, err := pair.standby.run("pg_ctl", "promote", "-D", pair.standby.data(), "-w", "-t", "30"); err != nil {
			log, _ := os.ReadFile(pair.standby.log())
			t.Fatalf("promote the standby: %v\n%s\n%s", err, out, log)
		}
		promoted := time.Since(promoting)
		leads := waitFor(30*time.Second, func() bool { return strings.Count(p.Logs(), logLeaderElected) > elected })
		ledIn := time.Since(promoting)
		resumed := b.markedAgain(30 * time.Second)
		markedIn := time.Since(promoting)
		pause(3 * time.Second)
		fw.stop()

		pc, pcErr := l.forgetGone(b.db.DB, 60*time.Second)
		r := settle(t, b, l, b.js, b.stream, c, nil, nil)
		acks := scrape(t, base)[mAcks]
		mode := "asynchronous"
		if sync {
			mode = "synchronous"
		}
		r.note("%s standby promoted 3 s after the primary was killed (pg_ctl promote took %s); in those 3 s the publisher led on the read-only standby: %v, refused to lead there %d times; it led again %v %s and marked again %v %s after the promotion began (elected %d times, alive=%v)",
			mode, promoted.Round(10*time.Millisecond), ledOnStandby, refused, leads, ledIn.Round(100*time.Millisecond), resumed,
			markedIn.Round(100*time.Millisecond), strings.Count(p.Logs(), logLeaderElected), !p.Exited())
		r.note("events lost in the failover with their business rows: %d of acknowledged commits, %d of commits that returned an error (%d such events landed); published before the failover, among the lost: %d; broken pairs %d (orphan events %d, orphan business rows %d)",
			pc.goneCommitted, pc.goneUnknown, pc.landed, r.ghosts, pc.broken, pc.orphanEvents, pc.orphanRows)
		r.note("writer errors %d, commits that returned an error %d; re-sent (PubAcks beyond events) %d",
			fw.errs.Load(), fw.unknown.Load(), int(acks)-r.delivered-r.ghosts)
		if pcErr != nil {
			r.note("%v", pcErr)
		}
		if anyHost && refused == 0 {
			r.note("the publisher never reached the standby: the row tests nothing")
			r.failed = true
		}
		if pcErr != nil || !leads || !resumed || p.Exited() || ledOnStandby || pc.broken != 0 || pc.orphanEvents != 0 || pc.orphanRows != 0 {
			r.failed = true
		}
		if sync && (pc.goneCommitted != 0 || r.ghosts != 0) {
			r.note("a synchronous standby lost acknowledged commits")
			r.failed = true
		}
		return r
	}
}
