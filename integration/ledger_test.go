//go:build faults

package integration

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/dedup"
	"github.com/pgnats/outbox/pkg/outbox"
)

// ledgerEntry is one event a fault test tried to write.
type ledgerEntry struct {
	id        string
	entity    string
	n         int  // the entity's number in the payload, from 1 in commit order
	committed bool // its transaction committed
	poison    bool // written to be refused; expected FAILED, not counted lost
	unknown   bool // its COMMIT errored: committed or not is asked of the database later (resolve)
	// gone: it may have committed (committed or unknown), but a failover
	// to an asynchronous standby lost it, with its business row
	// (forgetGone). Not counted lost; if delivered, counted a ghost.
	gone bool
}

// faultLedger records every event the writers of a scenario tried to write
// and whether its transaction committed.
type faultLedger struct {
	mu      sync.Mutex
	entries map[string]*ledgerEntry
	late    atomic.Int64 // transactions committed after a deliberate delay
}

func newFaultLedger() *faultLedger { return &faultLedger{entries: map[string]*ledgerEntry{}} }

func (l *faultLedger) add(ids []string, events []outbox.Event, committed, poison bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i, id := range ids {
		p := events[i].Data.(payload)
		l.entries[id] = &ledgerEntry{id: id, entity: p.Entity, n: p.N, committed: committed, poison: poison}
	}
}

// addUnknown records events whose COMMIT returned an error: the commit may
// have landed (a server crash after its commit record) or not. resolve
// asks the database once it answers.
func (l *faultLedger) addUnknown(ids []string, events []outbox.Event) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i, id := range ids {
		p := events[i].Data.(payload)
		l.entries[id] = &ledgerEntry{id: id, entity: p.Entity, n: p.N, unknown: true}
	}
}

// resolve asks the database whether the events of unknown commits exist,
// retrying until it answers or timeout passes, and records the answer. It
// returns how many events were unknown and how many of them had committed.
func (l *faultLedger) resolve(db *sqlx.DB, timeout time.Duration) (unknown, landed int, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var ids []string
	for _, e := range l.entries {
		if e.unknown {
			ids = append(ids, e.id)
		}
	}
	if len(ids) == 0 {
		return 0, 0, nil
	}
	var found []string
	waitFor(timeout, func() bool {
		found = nil
		err = db.Select(&found, `SELECT event_id::text FROM events WHERE event_id = ANY($1::uuid[])`, pq.Array(ids))
		return err == nil
	})
	if err != nil {
		return len(ids), 0, fmt.Errorf("resolve %d events of unknown commits: %w", len(ids), err)
	}
	for _, id := range found {
		l.entries[id].committed = true
		landed++
	}
	for _, id := range ids {
		l.entries[id].unknown = false
	}
	return len(ids), landed, nil
}

// counts returns how many entries committed and rolled back.
func (l *faultLedger) counts() (committed, rolledBack int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, e := range l.entries {
		if e.committed {
			committed++
		} else {
			rolledBack++
		}
	}
	return committed, rolledBack
}

// writerLoad describes the writers of a scenario.
type writerLoad struct {
	writers     int           // goroutines, each owning its own entities
	entities    int           // entities per writer
	pause       time.Duration // between transactions of one writer
	rollbackPct int           // transactions rolled back on purpose
	latePct     int           // transactions that wait lateFor between insert and commit
	lateFor     time.Duration
	// business: each transaction also inserts one row per event into
	// fault_business (the service's own change), which the scenario
	// creates; forgetGone checks the pairs.
	business bool
}

var steadyLoad = writerLoad{writers: 4, entities: 10, pause: 5 * time.Millisecond}

// faultWriters runs load against b until stopped, recording each event in
// the ledger. Each writer owns its entities, so it serialises their writes
// as a service must; a rolled-back transaction's numbers are reused.
type faultWriters struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	errs   atomic.Int64
	// unknown counts transactions whose COMMIT returned an error.
	unknown atomic.Int64
	mu      sync.Mutex
	last    error
}

func startFaultWriters(t *testing.T, b *bundle, l *faultLedger, load writerLoad) *faultWriters {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	fw := &faultWriters{cancel: cancel}
	subject := b.prefix + ".order.updated"
	for i := range load.writers {
		fw.wg.Add(1)
		go func() {
			defer fw.wg.Done()
			entities := entityNames(fmt.Sprintf("w%d-", i), load.entities)
			next := map[string]int{}
			rng := rand.New(rand.NewPCG(uint64(i), uint64(time.Now().UnixNano())))
			for ctx.Err() == nil {
				n := 1 + rng.IntN(4)
				events := make([]outbox.Event, n)
				for k := range events {
					e := entities[rng.IntN(len(entities))]
					next[e]++
					events[k] = outbox.Event{EntityType: "order", EntityID: e, Type: "OrderUpdated",
						Subject: subject, Data: payload{Entity: e, N: next[e]}}
				}
				rollback := rng.IntN(100) < load.rollbackPct
				late := !rollback && rng.IntN(100) < load.latePct
				committed, err := fw.tx(b, l, events, rollback, late, load.lateFor, load.business)
				if !committed {
					for _, ev := range events {
						next[ev.EntityID]--
					}
				}
				if err != nil {
					fw.fail(err)
					time.Sleep(100 * time.Millisecond)
				}
				time.Sleep(load.pause)
			}
		}()
	}
	t.Cleanup(fw.stop)
	return fw
}

// tx writes events in one transaction and commits it, or rolls it back.
// It reports whether the events may exist afterwards, so the writer knows
// whether to reuse their numbers. An error from Commit leaves that unknown
// (the server may have crashed after writing the commit record): the
// events are recorded as unknown, settle asks the database once it
// answers, and their numbers are not reused (a gap if they did not
// commit, which is no inversion).
func (fw *faultWriters) tx(b *bundle, l *faultLedger, events []outbox.Event, rollback, late bool, lateFor time.Duration, business bool) (bool, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tx, err := b.db.BeginTxx(ctx, nil)
	if err != nil {
		return false, err
	}
	defer tx.Rollback() //nolint:errcheck // no-op after commit
	uids, err := b.w.Write(ctx, tx, events...)
	if err != nil {
		return false, err
	}
	ids := make([]string, len(uids))
	for i, u := range uids {
		ids[i] = u.String()
	}
	if business {
		if err := insertBusiness(ctx, tx, ids, events); err != nil {
			return false, err
		}
	}
	if rollback {
		if err := tx.Rollback(); err != nil {
			return false, err
		}
		l.add(ids, events, false, false)
		return false, nil
	}
	if late {
		// The transaction holds seqs lower than those other writers
		// commit meanwhile: the publisher must not skip it.
		time.Sleep(lateFor)
		l.late.Add(1)
	}
	if err := tx.Commit(); err != nil {
		l.addUnknown(ids, events)
		fw.unknown.Add(1)
		return true, err
	}
	l.add(ids, events, true, false)
	return true, nil
}

func (fw *faultWriters) fail(err error) {
	fw.errs.Add(1)
	fw.mu.Lock()
	fw.last = err
	fw.mu.Unlock()
}

// stop stops the writers and waits for them.
func (fw *faultWriters) stop() {
	fw.cancel()
	fw.wg.Wait()
}

// faultConsumer is a durable pull consumer that processes each message
// with pkg/dedup, writing one effect row per processed message into
// fault_effects (no unique key: a second effect of one event is a
// duplicate after dedup). With crashPerMille > 0 it "crashes" after that
// share (in thousandths) of commits: it closes its NATS connection without acking, as a consumer
// process dying between its commit and its ack would, and starts again.
type faultConsumer struct {
	url, stream   string
	proc          *dedup.Processor
	crashPerMille int
	cancel        context.CancelFunc
	done          chan struct{}

	crashes    atomic.Int64
	duplicates atomic.Int64 // deliveries dedup skipped
	errors     atomic.Int64
}

const faultConsumerName = "faults"

func startFaultConsumer(t *testing.T, b *bundle, url, stream string, crashPerMille int) *faultConsumer {
	t.Helper()
	_, err := b.fxDB().Exec(`CREATE TABLE IF NOT EXISTS fault_effects (event_id text NOT NULL, entity text NOT NULL, n int NOT NULL)`)
	if err != nil {
		t.Fatalf("create fault_effects: %v", err)
	}
	proc, err := dedup.New(b.fxDB().DB, dedup.Config{})
	if err != nil {
		t.Fatalf("dedup.New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &faultConsumer{url: url, stream: stream, proc: proc, crashPerMille: crashPerMille, cancel: cancel, done: make(chan struct{})}
	go c.run(ctx)
	t.Cleanup(c.stop)
	return c
}

func (c *faultConsumer) stop() {
	c.cancel()
	<-c.done
}

func (c *faultConsumer) run(ctx context.Context) {
	defer close(c.done)
	rng := rand.New(rand.NewPCG(7, uint64(time.Now().UnixNano())))
	for ctx.Err() == nil {
		c.session(ctx, rng)
		select {
		case <-ctx.Done():
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// session connects, consumes until an error or a simulated crash, and
// closes the connection without acking what is in hand.
func (c *faultConsumer) session(ctx context.Context, rng *rand.Rand) {
	nc, err := nats.Connect(c.url, nats.Timeout(2*time.Second), nats.ReconnectBufSize(-1), nats.MaxReconnects(-1),
		nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		return
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	cons, err := js.CreateOrUpdateConsumer(cctx, c.stream, jetstream.ConsumerConfig{
		Durable: faultConsumerName, AckPolicy: jetstream.AckExplicitPolicy, AckWait: 2 * time.Second,
		MaxAckPending: 2000,
	})
	cancel()
	if err != nil {
		return
	}
	for ctx.Err() == nil {
		// A crash leaves the rest of its batch to AckWait: keep batches
		// small when crashing.
		size := 200
		if c.crashPerMille > 0 {
			size = 20
		}
		batch, err := cons.Fetch(size, jetstream.FetchMaxWait(500*time.Millisecond))
		if err != nil {
			return
		}
		for m := range batch.Messages() {
			id := m.Headers().Get(outbox.HeaderEventID)
			var p payload
			_ = json.Unmarshal(m.Data(), &p)
			res, err := c.proc.Process(ctx, faultConsumerName, id, func(ctx context.Context, tx *sqlx.Tx) error {
				_, err := tx.ExecContext(ctx, `INSERT INTO fault_effects (event_id, entity, n) VALUES ($1, $2, $3)`, id, p.Entity, p.N)
				return err
			})
			if err != nil {
				c.errors.Add(1)
				_ = m.Nak()
				continue
			}
			if res == dedup.Duplicate {
				c.duplicates.Add(1)
			}
			if res == dedup.Processed && c.crashPerMille > 0 && rng.IntN(1000) < c.crashPerMille {
				c.crashes.Add(1)
				return // committed, never acked: JetStream redelivers after AckWait
			}
			_ = m.Ack()
		}
		if batch.Error() != nil && !errors.Is(batch.Error(), nats.ErrTimeout) {
			return
		}
	}
}

// faultRow is one line of the suite's table.
type faultRow struct {
	scenario                                        string
	written, delivered, lost, unexpected            int
	dupBefore, dupAfter, inversions, failedExpected int
	// ghosts: delivered events of the ledger's gone entries (published
	// from a primary that then lost them in a failover).
	ghosts int
	notes  []string
	failed bool
}

func (r *faultRow) note(format string, args ...any) {
	r.notes = append(r.notes, fmt.Sprintf(format, args...))
}

// classify compares the ledger with the stream's messages (in stream
// order) and the consumer's effects and fills the row's counts.
// blockedOK names entities whose undelivered events are expected (they
// wait behind a poison event).
func classify(t *testing.T, b *bundle, l *faultLedger, msgs []streamMsg, blockedOK map[string]bool) faultRow {
	t.Helper()
	var r faultRow
	l.mu.Lock()
	defer l.mu.Unlock()

	seen := map[string]int{}
	for _, m := range msgs {
		seen[m.eventID]++
	}
	for id, n := range seen {
		switch e := l.entries[id]; {
		case e != nil && e.gone:
			r.ghosts++
		case e == nil || !e.committed || e.poison:
			r.unexpected++
		}
		r.dupBefore += n - 1
	}
	var lostIDs []string
	for _, e := range l.entries {
		if !e.committed {
			continue
		}
		if e.poison {
			r.failedExpected++
			continue
		}
		r.written++
		switch {
		case seen[e.id] > 0:
			r.delivered++
		case blockedOK[e.entity]:
		default:
			r.lost++
			lostIDs = append(lostIDs, e.id)
		}
	}
	if len(lostIDs) > 0 {
		sort.Strings(lostIDs)
		r.note("lost e.g. %s", strings.Join(lostIDs[:min(3, len(lostIDs))], ","))
	}

	// Order: each entity's first copies must carry increasing numbers.
	last := map[string]int{}
	first := map[string]bool{}
	for _, m := range msgs {
		if first[m.eventID] {
			continue
		}
		first[m.eventID] = true
		if m.data.N <= last[m.data.Entity] {
			r.inversions++
		}
		last[m.data.Entity] = max(last[m.data.Entity], m.data.N)
	}

	var dups int
	if err := b.fxDB().Get(&dups, `SELECT coalesce(sum(c - 1), 0) FROM (SELECT count(*) AS c FROM fault_effects GROUP BY event_id) s`); err != nil {
		t.Errorf("count duplicate effects: %v", err)
	}
	r.dupAfter = dups
	return r
}

// effects returns how many distinct events the consumer processed.
func (b *bundle) effects(t *testing.T) int {
	t.Helper()
	var n int
	if err := b.fxDB().Get(&n, `SELECT count(DISTINCT event_id) FROM fault_effects`); err != nil {
		t.Errorf("count effects: %v", err)
	}
	return n
}

// waitFor polls cond every 50ms until it holds or timeout passes.
func waitFor(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
	return true
}

// settle waits until every committed, non-poison, non-blocked event of the
// ledger is SUCCESS and the consumer c has processed every delivered event
// (not checked when c is nil), and returns the scenario's row. before holds
// messages read earlier from a stream since deleted; they count as
// delivered ahead of the stream's.
func settle(t *testing.T, b *bundle, l *faultLedger, js jetstream.JetStream, stream string, c *faultConsumer, before []streamMsg, blockedOK map[string]bool) faultRow {
	t.Helper()
	unknown, landed, resolveErr := l.resolve(b.db.DB, 60*time.Second)
	committed, _ := l.counts()
	var poisonish int
	l.mu.Lock()
	blockedEntities := make([]string, 0, len(blockedOK))
	for e := range blockedOK {
		blockedEntities = append(blockedEntities, e)
	}
	for _, e := range l.entries {
		if e.committed && (e.poison || blockedOK[e.entity]) {
			poisonish++
		}
	}
	l.mu.Unlock()
	want := committed - poisonish
	ok := waitFor(60*time.Second, func() bool {
		var n int
		_ = b.db.Get(&n, `SELECT count(*) FROM events WHERE event_status = 'SUCCESS' AND NOT (entity_id = ANY($1))`, pq.Array(blockedEntities))
		return n >= want
	})
	msgs := append(append([]streamMsg(nil), before...), readStream(t, js, stream)...)
	r := classify(t, b, l, msgs, blockedOK)
	if unknown > 0 {
		r.note("%d events of commits that returned an error, %d of them found committed", unknown, landed)
	}
	if resolveErr != nil {
		r.note("%v", resolveErr)
		r.failed = true
	}
	if !ok {
		r.note("publisher did not drain within 60s")
		r.failed = true
	}
	if c != nil {
		if !waitFor(90*time.Second, func() bool { return b.effects(t) >= r.delivered }) {
			r.note("consumer processed %d of %d", b.effects(t), r.delivered)
			r.failed = true
		}
		if n := c.duplicates.Load(); n > 0 {
			r.note("dedup skipped %d", n)
		}
	}
	var failed, retried int
	_ = b.db.Get(&failed, `SELECT count(*) FROM events WHERE event_status = 'FAILED'`)
	_ = b.db.Get(&retried, `SELECT count(*) FROM events WHERE attempts > 0`)
	if failed != r.failedExpected {
		r.note("FAILED=%d (expected %d)", failed, r.failedExpected)
		r.failed = true
	}
	r.note("FAILED=%d attempts>0=%d", failed, retried)
	if r.lost != 0 || r.unexpected != 0 || r.dupAfter != 0 || r.inversions != 0 {
		r.failed = true
	}
	return r
}

// faultNATS connects the test to the NATS server at url, reconnecting
// forever.
func faultNATS(t *testing.T, url string) jetstream.JetStream {
	t.Helper()
	nc, err := nats.Connect(url, nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond), nats.ReconnectBufSize(-1))
	if err != nil {
		t.Fatalf("connect %s: %v", url, err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatalf("jetstream: %v", err)
	}
	return js
}

// faultBundle creates a stream covering a fresh prefix on js and returns a
// bundle for it, with its own schema.
func faultBundle(t *testing.T, js jetstream.JetStream, storage jetstream.StorageType) *bundle {
	t.Helper()
	prefix := "t" + testenv.Suffix()
	name := "F_" + strings.ToUpper(prefix)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: name, Subjects: []string{prefix + ".>"},
		Storage: storage, Duplicates: 2 * time.Minute}); err != nil {
		t.Fatalf("create stream: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = js.DeleteStream(ctx, name)
	})
	return newBundle(t, js, name, prefix)
}
