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
	// backlog, before it is written.
	success int
}

// drainResult is what one drain measured.
type drainResult struct {
	eventsPerSec float64
	cost         cost
	batches      int64
	roundTrips   int64
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
	if err := e.reset(ctx); err != nil {
		return out, err
	}
	if r.success > 0 {
		if err := e.published(ctx, r.success); err != nil {
			return out, err
		}
	}
	if err := e.prewrite(ctx, events, e.prefix+".drain"); err != nil {
		return out, err
	}
	const placeholder = "bench-placeholder"
	if r.replicas > 0 {
		if _, err := e.db.ExecContext(ctx, `INSERT INTO events_leases (part, partitions, owner, expires_at)
			SELECT k, $1, $2, now() + interval '1 hour' FROM generate_series(0, $1 - 1) k`, r.partitions, placeholder); err != nil {
			return out, fmt.Errorf("hold the leases: %w", err)
		}
	}
	rctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
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
	}
	e.prog.start(name, events)
	err = waitFor(ctx, 10*time.Minute, func() (bool, error) {
		n := 0
		for _, p := range ps {
			n += int(p.Stats().Published)
		}
		e.prog.set(n)
		return n >= events, nil
	})
	elapsed := time.Since(start)
	out.cost = meter.stop(ctx, events)
	if r.rt != nil {
		out.roundTrips = r.rt.n.Load() - rt0
	}
	e.prog.done()
	if err != nil {
		return out, err
	}
	for _, p := range ps {
		out.batches += p.Stats().Batches
	}
	out.eventsPerSec = float64(events) / elapsed.Seconds()
	return out, nil
}

// published puts n SUCCESS events in the table in one statement, then
// vacuums and analyzes it, as a table that has been publishing for a while.
func (e *env) published(ctx context.Context, n int) error {
	e.prog.start(fmt.Sprintf("write %d SUCCESS rows", n), 1)
	if _, err := e.db.ExecContext(ctx, `INSERT INTO events (event_id, event_target, event_type,
			entity_type, entity_id, event_data, event_status, published_at)
		SELECT gen_random_uuid(), $1, 'Tick', 'bench', (g % $2)::text, $3, 'SUCCESS', now()
		FROM generate_series(1, $4) g`, e.prefix+".old", e.cfg.Entities, makePayload(e.cfg.Payload), n); err != nil {
		return fmt.Errorf("write SUCCESS rows: %w", err)
	}
	if _, err := e.db.ExecContext(ctx, `VACUUM ANALYZE events`); err != nil {
		return fmt.Errorf("vacuum: %w", err)
	}
	e.prog.set(1)
	e.prog.done()
	return nil
}
