package bench

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/pkg/outbox"
)

// latency offers rate events/s, one event a transaction, for the
// configured duration with the publisher running (NOTIFY on), and measures
// each event from its transaction's commit to its receipt by a JetStream
// consumer.
//
// The measurement starts after a warm-up: a tenth of a second of the same
// load, whose events are not counted. A publisher's first batches open
// its pool connections, prepare its statements and look up the stream;
// that one-time cost, tens of milliseconds, would otherwise be the tail of
// every run.
func (e *env) latency(ctx context.Context, rate int, d time.Duration) (Latency, error) {
	if err := e.reset(ctx); err != nil {
		return Latency{}, err
	}
	received := map[uuid.UUID]time.Time{}
	var mu sync.Mutex
	s, err := e.js.Stream(ctx, e.stream)
	if err != nil {
		return Latency{}, err
	}
	cons, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{e.prefix + ".lat"}, DeliverPolicy: jetstream.DeliverNewPolicy,
	})
	if err != nil {
		return Latency{}, err
	}
	cc, err := cons.Consume(func(m jetstream.Msg) {
		now := time.Now()
		id, err := uuid.Parse(m.Headers().Get(outbox.HeaderEventID))
		if err != nil {
			return
		}
		mu.Lock()
		received[id] = now
		mu.Unlock()
	})
	if err != nil {
		return Latency{}, err
	}
	defer cc.Stop()

	p, err := poller.New(poller.Config{DB: e.db.DB, DSN: e.dsn, NATS: e.nc, BatchSize: e.cfg.BatchSize})
	if err != nil {
		return Latency{}, err
	}
	rctx, cancel := context.WithCancel(ctx)
	var pwg sync.WaitGroup
	pwg.Add(1)
	go func() {
		defer pwg.Done()
		_ = p.Run(rctx)
	}()
	defer func() { cancel(); pwg.Wait() }()
	if err := waitFor(ctx, 10*time.Second, func() (bool, error) { return p.Stats().Leader, nil }); err != nil {
		return Latency{}, fmt.Errorf("publisher did not start: %w", err)
	}

	warm, _, err := e.offer(ctx, rate, max(rate/10, 1))
	if err != nil {
		return Latency{}, err
	}
	if err := waitFor(ctx, 30*time.Second, func() (bool, error) {
		mu.Lock()
		defer mu.Unlock()
		return len(received) >= len(warm), nil
	}); err != nil {
		return Latency{}, fmt.Errorf("warm-up: %w", err)
	}
	mu.Lock()
	clear(received)
	mu.Unlock()

	total := int(float64(rate) * d.Seconds())
	committed, elapsed, err := e.offer(ctx, rate, total)
	if err != nil {
		return Latency{}, err
	}
	e.prog.start(fmt.Sprintf("latency drain %d/s", rate), len(committed))
	err = waitFor(ctx, 60*time.Second, func() (bool, error) {
		mu.Lock()
		n := len(received)
		mu.Unlock()
		e.prog.set(n)
		return n >= len(committed), nil
	})
	e.prog.done()
	if err != nil {
		return Latency{}, fmt.Errorf("waiting for %d events: %w", len(committed), err)
	}
	mu.Lock()
	defer mu.Unlock()
	ms := make([]float64, 0, len(committed))
	for id, at := range committed {
		ms = append(ms, float64(received[id].Sub(at))/float64(time.Millisecond))
	}
	slices.Sort(ms)
	q := func(f float64) float64 { return ms[min(len(ms)-1, int(f*float64(len(ms))))] }
	return Latency{Rate: rate, EventsPerTx: eventsPerTx(rate), AchievedRate: float64(len(ms)) / elapsed.Seconds(), Samples: len(ms),
		P50: q(0.50), P95: q(0.95), P99: q(0.99), Max: ms[len(ms)-1]}, nil
}

// maxTxRate bounds the transactions a second the latency runs offer: above
// it, each transaction carries several events, as a busy service's would.
// This machine's writers commit a few thousand transactions a second at
// most, so single-event transactions could not offer the higher rates.
const maxTxRate = 2000

// eventsPerTx is how many events each transaction of a latency run at rate
// events/s carries.
func eventsPerTx(rate int) int { return max(1, (rate+maxTxRate-1)/maxTxRate) }

// offer writes total events at rate events/s from a pool of writers,
// eventsPerTx(rate) a transaction, and returns each event's commit time.
func (e *env) offer(ctx context.Context, rate, total int) (map[uuid.UUID]time.Time, time.Duration, error) {
	perTx := eventsPerTx(rate)
	txs := (total + perTx - 1) / perTx
	writers := max(8, min(64, rate/perTx/250))
	tokens := make(chan int, writers)
	payload := makePayload(e.cfg.Payload)
	type commit struct {
		ids []uuid.UUID
		at  time.Time
	}
	results := make(chan []commit, writers)
	errs := make(chan error, writers)
	for range writers {
		go func() {
			var mine []commit
			defer func() { results <- mine }()
			evs := make([]outbox.Event, perTx)
			for i := range tokens {
				for j := range evs {
					evs[j] = outbox.Event{EntityType: "bench", EntityID: fmt.Sprint((i*perTx + j) % e.cfg.Entities),
						Type: "Tick", Subject: e.prefix + ".lat", Data: payload}
				}
				tx, err := e.db.BeginTx(ctx, nil)
				if err != nil {
					errs <- err
					return
				}
				ids, err := e.w.Write(ctx, tx, evs...)
				if err != nil {
					tx.Rollback() //nolint:errcheck
					errs <- err
					return
				}
				if err := tx.Commit(); err != nil {
					errs <- err
					return
				}
				mine = append(mine, commit{ids, time.Now()})
			}
		}()
	}
	e.prog.start(fmt.Sprintf("offer %d/s", rate), total)
	start := time.Now()
	interval := time.Second * time.Duration(perTx) / time.Duration(rate)
	var err error
feed:
	for i := range txs {
		if d := time.Until(start.Add(time.Duration(i) * interval)); d > time.Millisecond {
			time.Sleep(d)
		}
		select {
		case tokens <- i:
		case err = <-errs:
			break feed
		case <-ctx.Done():
			err = ctx.Err()
			break feed
		}
		if i%500 == 0 {
			e.prog.set(i * perTx)
		}
	}
	close(tokens)
	out := make(map[uuid.UUID]time.Time, total)
	for range writers {
		for _, c := range <-results {
			for _, id := range c.ids {
				out[id] = c.at
			}
		}
	}
	elapsed := time.Since(start)
	e.prog.set(total)
	e.prog.done()
	if err == nil {
		select {
		case err = <-errs:
		default:
		}
	}
	return out, elapsed, err
}
