package poller_test

import (
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

// A server whose max_payload is lower than the 1 MiB Write assumes: an
// event over it is FAILED with the reason, the other entities flow, and the
// connection stays up.
func TestServerLimitsBelowDefaults(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		opts func(*server.Options)
		bad  func(prefix string) outbox.Event
	}{
		{"max_payload 256 KiB", func(o *server.Options) { o.MaxPayload = 256 << 10 }, func(p string) outbox.Event {
			return outbox.Event{Subject: p + ".order.changed", Data: json.RawMessage(`"` + strings.Repeat("x", 300_000) + `"`)}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			opts := &server.Options{JetStream: true, Host: "127.0.0.1", Port: server.RANDOM_PORT}
			tc.opts(opts)
			srv := testenv.StartNATSServer(t, opts)
			nc, js := srv.Connect(t)
			b := newBundle(t, nc, js)
			b.prefix = "p" + testenv.Suffix()
			b.createStream(t, jetstream.StreamConfig{Subjects: []string{b.prefix + ".>"}, Storage: jetstream.MemoryStorage})
			bad := tc.bad(b.prefix)
			bad.EntityType, bad.EntityID, bad.Type = "order", "bad", "Changed"
			b.write(t, bad)
			var others []outbox.Event
			for i := range 3 {
				others = append(others, outbox.Event{EntityType: "order", EntityID: fmt.Sprint(i), Type: "Changed",
					Subject: b.prefix + ".order.changed", Data: json.RawMessage(`{}`)})
			}
			b.write(t, others...)
			b.start(t, fastConfig())
			testenv.Eventually(t, 20*time.Second, func() bool {
				return b.db.Count(t, "SUCCESS")+b.db.Count(t, "FAILED") == 4
			}, "every event published or FAILED (READY %d)", b.db.Count(t, "READY"))
			require.Equal(t, 3, b.db.Int(t, `SELECT count(*) FROM events WHERE entity_id <> 'bad' AND event_status = 'SUCCESS'`))
			require.NoError(t, nc.FlushTimeout(5*time.Second))
		})
	}
}
