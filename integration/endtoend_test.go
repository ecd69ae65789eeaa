package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/dedup"
)

// TestEndToEnd writes events in many concurrent transactions while the
// publisher runs, and consumes them with pkg/dedup through two durable
// consumers, so every message is delivered at least twice: each event is
// written once, reaches the stream once, and is processed exactly once, and
// each entity's events are in the stream in write order.
func TestEndToEnd(t *testing.T) {
	t.Parallel()
	b := setup(t)
	const (
		writers   = 5
		perWriter = 10 // entities per writer, 50 in all
		total     = 2000
	)
	_, err := b.db.Exec(`CREATE TABLE received (
		entity text NOT NULL,
		n      int  NOT NULL,
		PRIMARY KEY (entity, n))`)
	require.NoError(t, err)

	var delivered, processed, handlerErrs atomic.Int64
	consume := startConsumers(t, b, "billing", []string{"billing-a", "billing-b"},
		func(ctx context.Context, tx *sqlx.Tx, msg jetstream.Msg) error {
			var p payload
			if err := json.Unmarshal(msg.Data(), &p); err != nil {
				return dedup.Permanent(err)
			}
			if _, err := tx.ExecContext(ctx, `INSERT INTO received (entity, n) VALUES ($1, $2)`, p.Entity, p.N); err != nil {
				handlerErrs.Add(1)
				return err
			}
			processed.Add(1)
			return nil
		}, &delivered)
	defer consume()

	startPublisher(t, "publisher", b.db.DSN)

	// Each writer owns its entities, so each entity's writes are serialised.
	ctx := context.Background()
	sws := make([]*seqWriter, writers)
	errs := make(chan error, writers)
	var wg sync.WaitGroup
	for i := range sws {
		sws[i] = b.seqWriter(b.prefix+".order.updated", entityNames(fmt.Sprintf("w%d-", i), perWriter), uint64(i))
		wg.Add(1)
		go func(s *seqWriter) {
			defer wg.Done()
			errs <- s.write(ctx, total/writers, 8)
		}(sws[i])
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	want := map[string]int{}
	for _, s := range sws {
		maps.Copy(want, s.next)
	}

	b.waitAllSuccess(t, total, 60*time.Second)
	testenv.Eventually(t, 60*time.Second, func() bool {
		return delivered.Load() >= 2*total && b.db.Int(t, `SELECT count(*) FROM received`) == total
	}, "consumers did not get and process every message twice")

	require.Equal(t, total, b.db.Int(t, `SELECT count(*) FROM received`), "rows written by the consumer")
	require.Equal(t, total, b.db.Int(t, `SELECT count(*) FROM processed_message WHERE consumer_id = 'billing'`))
	require.EqualValues(t, total, processed.Load(), "handler runs: each message processed exactly once")
	require.Zero(t, handlerErrs.Load(), "handler errors (a duplicate reached the handler)")

	msgs := readStream(t, b.js, b.stream)
	requireEachOnce(t, msgs, b.db.IDs(t, ""))
	requireInOrder(t, msgs, want)
}

// startConsumers creates a durable pull consumer per name on the test's
// stream, each consuming every message with a dedup handler for consumer,
// and counts deliveries. The returned function stops them.
func startConsumers(t *testing.T, b *bundle, consumer string, durables []string,
	fn func(context.Context, *sqlx.Tx, jetstream.Msg) error, delivered *atomic.Int64,
) func() {
	t.Helper()
	proc, err := dedup.New(b.db.DB, dedup.Config{})
	require.NoError(t, err)
	handle := proc.Handler(dedup.HandlerConfig{Consumer: consumer, NakDelay: 100 * time.Millisecond}, fn)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var ccs []jetstream.ConsumeContext
	for _, name := range durables {
		c, err := b.js.CreateOrUpdateConsumer(ctx, b.stream, jetstream.ConsumerConfig{
			Durable: name, AckPolicy: jetstream.AckExplicitPolicy, AckWait: 30 * time.Second,
		})
		require.NoError(t, err)
		cc, err := c.Consume(func(msg jetstream.Msg) {
			handle(msg)
			delivered.Add(1)
		})
		require.NoError(t, err)
		ccs = append(ccs, cc)
	}
	var once sync.Once
	stop := func() {
		once.Do(func() {
			for _, cc := range ccs {
				cc.Stop()
			}
		})
	}
	t.Cleanup(stop)
	return stop
}
