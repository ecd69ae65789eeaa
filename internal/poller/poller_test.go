package poller_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// bundle is one test's database schema, stream and publisher settings.
type bundle struct {
	db     *testenv.DB
	nc     *nats.Conn
	js     jetstream.JetStream
	stream jetstream.Stream
	prefix string
	w      *outbox.Writer
}

func setup(t *testing.T) *bundle {
	t.Helper()
	db := testenv.NewDB(t)
	nc, js := testenv.NATS(t)
	s, prefix := testenv.Stream(t, js)
	w, err := outbox.NewWriter(outbox.Config{})
	require.NoError(t, err)
	return &bundle{db: db, nc: nc, js: js, stream: s, prefix: prefix, w: w}
}

// start runs a poller until the test ends.
func (b *bundle) start(t *testing.T, cfg poller.Config) *poller.Poller {
	t.Helper()
	cfg.DB = b.db.DB.DB
	cfg.DSN = b.db.DSN
	if cfg.NATS == nil {
		cfg.NATS = b.nc
	}
	p, err := poller.New(cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		require.NoError(t, p.Run(ctx))
	}()
	t.Cleanup(func() { cancel(); wg.Wait() })
	return p
}

func (b *bundle) write(t *testing.T, events ...outbox.Event) {
	t.Helper()
	tx, err := b.db.Beginx()
	require.NoError(t, err)
	_, err = b.w.Write(context.Background(), tx, events...)
	require.NoError(t, err)
	require.NoError(t, tx.Commit())
}

func (b *bundle) count(t *testing.T, status string) int {
	t.Helper()
	var n int
	require.NoError(t, b.db.Get(&n, `SELECT count(*) FROM events WHERE event_status = $1`, status))
	return n
}

// received reads every message of the stream, in stream order.
func (b *bundle) received(t *testing.T) []jetstream.Msg {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info, err := b.stream.Info(ctx)
	require.NoError(t, err)
	c, err := b.stream.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	require.NoError(t, err)
	var out []jetstream.Msg
	for uint64(len(out)) < info.State.Msgs {
		m, err := c.Next(jetstream.FetchMaxWait(5 * time.Second))
		require.NoError(t, err)
		out = append(out, m)
	}
	return out
}

func TestPublishHappyPath(t *testing.T) {
	t.Parallel()
	b := setup(t)
	const entities, perEntity = 20, 25
	var events []outbox.Event
	for i := range perEntity {
		for e := range entities {
			events = append(events, outbox.Event{
				EntityType: "order", EntityID: fmt.Sprint(e), Type: "Changed",
				Subject: b.prefix + ".order.changed", Data: map[string]int{"n": i},
			})
		}
	}
	b.write(t, events[:250]...)
	b.start(t, poller.Config{BatchSize: 64, Logger: testLogger(t)})
	b.write(t, events[250:]...)

	testenv.Eventually(t, 30*time.Second, func() bool { return b.count(t, "SUCCESS") == len(events) },
		"all %d events SUCCESS", len(events))
	msgs := b.received(t)
	require.Len(t, msgs, len(events))
	last := map[string]int{}
	for _, m := range msgs {
		var n struct{ N int }
		require.NoError(t, jsonUnmarshal(m.Data(), &n))
		ent := m.Headers().Get(outbox.HeaderEntityID)
		if prev, ok := last[ent]; ok {
			require.Equal(t, prev+1, n.N, "entity %s out of order", ent)
		}
		last[ent] = n.N
		require.Equal(t, m.Headers().Get(outbox.HeaderEventID), m.Headers().Get(jetstream.MsgIDHeader))
	}
}
