package poller_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// A server whose max_control_line is below the 4096 bytes Write assumes by
// default: the server's INFO does not announce the limit, so the publisher
// is told it (Config.MaxControlLine, --nats-max-control-line). An event
// written by a writer left at the default, whose protocol line exceeds the
// server's limit, is FAILED with the reason and never sent; the other
// entities flow, and the connection stays up. A writer told the limit
// refuses such an event. (Before, the server closed the connection, the
// poller stopped, and the same row closed every new connection: nothing was
// published again.)
func TestServerMaxControlLineBelowDefault(t *testing.T) {
	t.Parallel()
	opts := &server.Options{JetStream: true, MaxControlLine: 1024}
	srv := testenv.StartNATSServer(t, opts)
	nc, js := srv.Connect(t)
	b := newBundle(t, nc, js)
	b.prefix = "p" + testenv.Suffix()
	b.createStream(t, jetstream.StreamConfig{Subjects: []string{b.prefix + ".>"}, Storage: jetstream.MemoryStorage})
	b.write(t, outbox.Event{EntityType: "order", EntityID: "bad", Type: "Changed",
		Subject: b.prefix + ".order." + strings.Repeat("a", 2000), Data: json.RawMessage(`{}`)})
	var others []outbox.Event
	for i := range 3 {
		others = append(others, outbox.Event{EntityType: "order", EntityID: fmt.Sprint(i), Type: "Changed",
			Subject: b.prefix + ".order.changed", Data: json.RawMessage(`{}`)})
	}
	b.write(t, others...)
	strict, err := outbox.NewWriter(outbox.Config{MaxControlLine: 1024})
	require.NoError(t, err)
	tx, err := b.db.Beginx()
	require.NoError(t, err)
	_, err = strict.Write(context.Background(), tx, outbox.Event{EntityType: "order", EntityID: "bad", Type: "Changed",
		Subject: b.prefix + ".order." + strings.Repeat("a", 2000), Data: json.RawMessage(`{}`)})
	require.ErrorIs(t, err, outbox.ErrInvalidEvent)
	require.ErrorContains(t, err, "max_control_line of 1024")
	require.NoError(t, tx.Rollback())

	cfg := fastConfig()
	cfg.MaxControlLine = 1024
	b.start(t, cfg)
	testenv.Eventually(t, 20*time.Second, func() bool {
		return b.db.Count(t, "SUCCESS")+b.db.Count(t, "FAILED") == 4
	}, "every event published or FAILED (READY %d)", b.db.Count(t, "READY"))
	require.Equal(t, 3, b.db.Count(t, "SUCCESS"))
	var lastError string
	require.NoError(t, b.db.Get(&lastError, `SELECT coalesce(max(last_error), '') FROM events WHERE event_status = 'FAILED'`))
	require.Contains(t, lastError, "max_control_line of 1024")
	require.NoError(t, nc.FlushTimeout(5*time.Second))
	require.Zero(t, nc.Stats().Reconnects, "the connection was closed")
	require.Len(t, b.received(t), 3)
}
