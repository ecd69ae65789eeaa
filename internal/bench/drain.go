package bench

import (
	"cmp"
	"context"
	"database/sql"
	"fmt"
	"runtime/pprof"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/pgnats/outbox/internal/poller"
)

// drainRun is one drain measurement.
type drainRun struct {
	batch int
	// skipPublish: claim and mark only (the database's ceiling).
	skipPublish bool
	// replicas > 0: that many publishers with partitions, each on its own
	// NATS connection; 0: one single-leader publisher.
	replicas, partitions int
	// events overrides the configured backlog when positive.
	events int
	// db, when set, is the pool the publisher claims and marks through.
	db *sql.DB
	// rt, when set, counts db's round trips during the measurement.
	rt *rtProxy
	// success rows already published are put in the table, below the
	// backlog, before it is written; with old, they were published two
	// days ago, past the retention the run may apply.
	success int
	old     bool
	// keep drains over the table as the last run left it, instead of
	// emptying it first.
	keep bool
	// entities overrides the configured number the backlog spreads over.
	entities int
	// blocked entities, each with a FAILED event and blockedBehind READY
	// events after it, are written below the backlog.
	blocked int
	// bulk writes the backlog in INSERT … SELECT statements rather than
	// through the writer.
	bulk bool
	// window, when positive, also measures the rates over the first and
	// the last window events drained.
	window int
	// timeClaims times the publisher's claims (claimtime.go).
	timeClaims bool
	// retention runs the retention chore while the backlog drains.
	retention bool
	// settle vacuums and analyzes the table once it is filled, backlog
	// included, and checkpoints before the drain, so that the WAL the
	// table's preparation (or the drain before) wrote is not flushed
	// during it.
	settle bool
}

// drainResult is what one drain measured.
type drainResult struct {
	eventsPerSec float64
	cost         cost
	batches      int64
	roundTrips   int64
	claims       ClaimLatency
	// With window: the rates and claims over the first and last window
	// events.
	first, last             float64
	claimsFirst, claimsLast ClaimLatency
	retention               retentionResult
}

// drain pre-writes the backlog and measures how fast the publishers of r
// empty it.
//
// Partitioned replicas start with every partition leased to a placeholder
// owner, so none publishes until all have registered; the clock starts when
// the placeholder leases are deleted, and each replica then takes its share
// at its next round (within LeaderTimeout/5 = 200 ms here), so the figure
// includes a hand-over but not the joining.
func (e *env) drain(ctx context.Context, r drainRun) (float64, error) {
	d, err := e.drainCost(ctx, r)
	return d.eventsPerSec, err
}

// drainCost is drain, with the CPU per event and the batches.
func (e *env) drainCost(ctx context.Context, r drainRun) (drainResult, error) {
	var out drainResult
	events := cmp.Or(r.events, e.cfg.Events)
	if err := e.fill(ctx, r, events); err != nil {
		return out, err
	}
	if r.settle {
		// Needs superuser or pg_checkpoint; without them, drain unsettled.
		_, _ = e.db.ExecContext(ctx, `CHECKPOINT`)
	}
	const placeholder = "bench-placeholder"
	if r.replicas > 0 {
		if _, err := e.db.ExecContext(ctx, `INSERT INTO events_leases (part, partitions, owner, expires_at)
			SELECT k, $1, $2, now() + interval '1 hour' FROM generate_series(0, $1 - 1) k`, r.partitions, placeholder); err != nil {
			return out, fmt.Errorf("hold the leases: %w", err)
		}
	}
	var claims *stmtTimer
	if r.timeClaims {
		claims = &stmtTimer{match: isClaim}
		db, err := claims.open(e.dsn)
		if err != nil {
			return out, err
		}
		defer db.Close()
		r.db = db
	}
	rctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	var ret *retentionRun
	if r.retention {
		var err error
		if ret, err = e.startRetention(rctx); err != nil {
			return out, err
		}
		defer ret.stop()
	}
	var ps []*poller.Poller
	for i := range max(r.replicas, 1) {
		db := e.db.DB
		if r.db != nil {
			db = r.db
		}
		cfg := poller.Config{DB: db, DSN: e.dsn, NATS: e.nc, BatchSize: r.batch, SkipPublish: r.skipPublish}
		if r.replicas > 0 {
			nc, err := nats.Connect(e.cfg.NATSURL, append([]nats.Option{nats.ReconnectBufSize(-1)}, e.cfg.NATSOptions...)...)
			if err != nil {
				return out, err
			}
			defer nc.Close()
			cfg.NATS, cfg.Partitions, cfg.ReplicaID = nc, r.partitions, fmt.Sprintf("bench-%d", i+1)
			cfg.LeaderTimeout = time.Second
		}
		p, err := poller.New(cfg)
		if err != nil {
			return out, err
		}
		ps = append(ps, p)
		// The label lets a CPU profile (--cpuprofile) tell the loop's
		// samples from the rest of the bench: go tool pprof -tagfocus
		// bench=publisher.
		wg.Go(func() {
			pprof.Do(rctx, pprof.Labels("bench", "publisher"), func(ctx context.Context) { _ = p.Run(ctx) })
		})
	}
	if r.replicas > 0 {
		if err := waitFor(ctx, 30*time.Second, func() (bool, error) {
			var n int
			err := e.db.GetContext(ctx, &n, `SELECT count(*) FROM events_replicas`)
			return n >= r.replicas, err
		}); err != nil {
			return out, fmt.Errorf("replicas registering: %w", err)
		}
		if _, err := e.db.ExecContext(ctx, `DELETE FROM events_leases WHERE owner = $1`, placeholder); err != nil {
			return out, err
		}
	}
	meter, err := e.startMeter(ctx)
	if err != nil {
		return out, err
	}
	var rt0 int64
	if r.rt != nil {
		rt0 = r.rt.n.Load()
	}
	start := time.Now()
	name := fmt.Sprintf("drain, batch %d", r.batch)
	switch {
	case r.skipPublish:
		name = "claim+mark only"
	case r.replicas > 0:
		name = fmt.Sprintf("drain, replicas=%d", r.replicas)
	case r.retention:
		name = "drain, retention on"
	}
	e.prog.start(name, events)
	track := progressTrack{{at: start}}
	err = waitFor(ctx, 30*time.Minute, func() (bool, error) {
		n := 0
		for _, p := range ps {
			n += int(p.Stats().Published)
		}
		e.prog.set(n)
		if r.window > 0 {
			track = append(track, trackPoint{at: time.Now(), n: n})
		}
		return n >= events, nil
	})
	end := time.Now()
	elapsed := end.Sub(start)
	out.cost = meter.stop(ctx, events)
	if r.rt != nil {
		out.roundTrips = r.rt.n.Load() - rt0
	}
	if ret != nil {
		out.retention = ret.stop()
	}
	e.prog.done()
	if err != nil {
		return out, err
	}
	for _, p := range ps {
		out.batches += p.Stats().Batches
	}
	out.eventsPerSec = float64(events) / elapsed.Seconds()
	if claims != nil {
		out.claims = claims.latency(start, end)
	}
	if r.window > 0 {
		// The first window starts with the first claim, when timed: the
		// publisher's start (connections, leadership) is not the backlog's.
		w, from := min(r.window, events), start
		if claims != nil {
			if t := claims.firstStart(); t.After(from) {
				from = t
			}
		}
		t1, t2 := track.when(w), track.when(events-w)
		out.first = float64(w) / t1.Sub(from).Seconds()
		out.last = float64(w) / track.when(events).Sub(t2).Seconds()
		if claims != nil {
			out.claimsFirst = claims.latencyOfRows(0, int64(w))
			out.claimsLast = claims.latencyOfRows(int64(events-w), int64(events))
		}
	}
	return out, nil
}

// trackPoint is the count of events published at a time.
type trackPoint struct {
	at time.Time
	n  int
}

// progressTrack is a drain's published counts, read every few
// milliseconds.
type progressTrack []trackPoint

// when returns the time the count reached n, interpolated between the
// readings around it, so that a rate over a window never divides by zero.
func (t progressTrack) when(n int) time.Time {
	for i := 1; i < len(t); i++ {
		if t[i].n >= n {
			a, b := t[i-1], t[i]
			if b.n == a.n {
				return b.at
			}
			f := float64(n-a.n) / float64(b.n-a.n)
			return a.at.Add(time.Duration(f * float64(b.at.Sub(a.at))))
		}
	}
	return t[len(t)-1].at
}

// blockedBehind is how many READY events wait behind the FAILED event of
// each blocked entity.
const blockedBehind = 3

// fill prepares the table for drain r: the rows already there, then a
// backlog of events events.
func (e *env) fill(ctx context.Context, r drainRun, events int) error {
	if !r.keep {
		if err := e.reset(ctx); err != nil {
			return err
		}
	}
	entities := cmp.Or(r.entities, e.cfg.Entities)
	payload := makePayload(e.cfg.Payload)
	published := "now()"
	if r.old {
		published = "now() - interval '2 days'"
	}
	steps := []bulkInsert{
		{name: "SUCCESS rows", n: r.success, entities: e.cfg.Entities, subject: e.prefix + ".old",
			cols: "'SUCCESS', 0, NULL, " + published},
		// Each blocked entity: its FAILED event, then the READY ones.
		{name: "blocked entities", n: r.blocked, entities: r.blocked, entityPrefix: "blocked-", subject: e.prefix + ".blocked",
			cols: "'FAILED', 1, 'refused (bench)', NULL"},
		{name: "blocked events", n: r.blocked * blockedBehind, entities: r.blocked, entityPrefix: "blocked-", subject: e.prefix + ".blocked",
			cols: "'READY', 0, NULL, NULL"},
	}
	if r.bulk {
		steps = append(steps, bulkInsert{name: "backlog", n: events, entities: entities, subject: e.prefix + ".drain",
			cols: "'READY', 0, NULL, NULL"})
	}
	for _, b := range steps {
		if b.n > 0 {
			if err := e.insertBulk(ctx, b, payload); err != nil {
				return err
			}
		}
	}
	if !r.bulk {
		if err := e.prewrite(ctx, events, entities, e.prefix+".drain"); err != nil {
			return err
		}
	}
	if !r.settle {
		return nil
	}
	// Statistics as the table now stands: else the plan would follow what
	// the last drain left (a TRUNCATE keeps them), and one drain's figure
	// would depend on which ran before it.
	e.prog.start("vacuum analyze", 1)
	if _, err := e.db.ExecContext(ctx, `VACUUM ANALYZE events`); err != nil {
		return fmt.Errorf("vacuum: %w", err)
	}
	e.prog.set(1)
	e.prog.done()
	return nil
}

// bulkInsert is rows written with INSERT … SELECT generate_series, as a
// table that has been in use for a while holds them.
type bulkInsert struct {
	name     string
	n        int
	entities int
	// entityPrefix is put before the entity number, g % entities.
	entityPrefix string
	subject      string
	// cols are the SQL values of event_status, attempts, last_error and
	// published_at.
	cols string
}

// bulkChunk is the rows of one INSERT: big enough to be cheap, small
// enough for the progress to move.
const bulkChunk = 500_000

// insertBulk writes b's rows in statements of bulkChunk rows.
func (e *env) insertBulk(ctx context.Context, b bulkInsert, payload []byte) error {
	e.prog.start("write "+b.name, b.n)
	for done := 0; done < b.n; done += bulkChunk {
		to := min(done+bulkChunk, b.n)
		if _, err := e.db.ExecContext(ctx, `INSERT INTO events (event_id, event_target, event_type,
				entity_type, entity_id, event_data, event_status, attempts, last_error, published_at)
			SELECT gen_random_uuid(), $1, 'Tick', 'bench', $2 || (g % $3)::text, $4, `+b.cols+`
			FROM generate_series($5::int, $6::int) g`,
			b.subject, b.entityPrefix, b.entities, payload, done+1, to); err != nil {
			return fmt.Errorf("write %s: %w", b.name, err)
		}
		e.prog.set(to)
	}
	e.prog.done()
	return nil
}
