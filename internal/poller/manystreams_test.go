package poller_test

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// An account with many streams (the stream list takes several pages): the
// publisher finds the covering stream and publishes, also after an outage,
// when it reads the whole list again before claiming.
func TestManyStreamsInTheAccount(t *testing.T) {
	t.Parallel()
	b, srv := setupServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	start := time.Now()
	const n = 1000
	for i := range n {
		_, err := b.js.CreateStream(ctx, jetstream.StreamConfig{Name: fmt.Sprint("MANY_", i),
			Subjects: []string{fmt.Sprintf("many%d.>", i)}, Storage: jetstream.MemoryStorage})
		require.NoError(t, err)
	}
	t.Logf("created %d streams in %s", n, time.Since(start))
	start = time.Now()
	l := b.js.ListStreams(ctx)
	count := 0
	for range l.Info() {
		count++
	}
	require.NoError(t, l.Err())
	t.Logf("listed %d streams in %s", count, time.Since(start))

	b.start(t, fastConfig())
	b.write(t, outbox.Event{EntityType: "order", EntityID: "1", Type: "Changed", Subject: b.prefix + ".order.changed", Data: json.RawMessage(`{}`)})
	testenv.Eventually(t, 15*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == 1 }, "published")
	srv.Stop()
	b.write(t, outbox.Event{EntityType: "order", EntityID: "1", Type: "Changed", Subject: b.prefix + ".order.changed", Data: json.RawMessage(`{}`)})
	time.Sleep(500 * time.Millisecond) // the outage, not a wait for an outcome
	srv.Start()
	testenv.Eventually(t, 20*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == 2 }, "published after the outage")
}
