package poller_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// storedRow is an events row written with SQL, past Write's checks: by an
// older writer, a migration or a hand.
type storedRow struct {
	subject, eventType, entityID, data string
	headers                            map[string]string
}

func (b *bundle) insertRow(t *testing.T, r storedRow) {
	t.Helper()
	h, err := json.Marshal(r.headers)
	require.NoError(t, err)
	if r.headers == nil {
		h = []byte("{}")
	}
	b.db.MustExec(`INSERT INTO events (event_id, event_target, event_type, entity_type, entity_id, event_data, headers)
		VALUES (gen_random_uuid(), $1, $2, 'order', $3, $4, $5)`, r.subject, r.eventType, r.entityID, []byte(r.data), string(h))
}

// The publisher applies Write's rule again to every row it claims: a row
// the NATS client or server would refuse is FAILED at once with the reason,
// before anything is sent. The loop never backs off for it, its entity's
// next event waits behind it, other entities flow, and the connection stays
// open.
func TestUnpublishableRowFailsAtOnce(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		bad    func(prefix string) storedRow
		reason string
	}{
		{"header name with slash", func(p string) storedRow {
			return storedRow{headers: map[string]string{"x-tenant/id": "1"}}
		}, `name "x-tenant/id"`},
		{"header name with at", func(p string) storedRow { return storedRow{headers: map[string]string{"user@org": "1"}} }, `name "user@org"`},
		{"header name with equals", func(p string) storedRow { return storedRow{headers: map[string]string{"a=b": "1"}} }, `name "a=b"`},
		{"header name with braces", func(p string) storedRow { return storedRow{headers: map[string]string{"{k}": "1"}} }, `name "{k}"`},
		{"header value of 70000 bytes", func(p string) storedRow {
			return storedRow{headers: map[string]string{"big": strings.Repeat("v", 70_000)}}
		}, "header block"},
		{"subject of 5000 bytes", func(p string) storedRow {
			return storedRow{subject: p + ".bh01." + strings.Repeat("a", 5000)}
		}, "max_control_line"},
		{"type of 1000000 bytes", func(p string) storedRow { return storedRow{eventType: strings.Repeat("T", 1_000_000)} }, "Type"},
		{"JSON string of 1048400 bytes", func(p string) storedRow {
			return storedRow{data: `"` + strings.Repeat("x", 1_048_400-2) + `"`}
		}, "over the maximum"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := setup(t)
			p := b.start(t, fastConfig())
			subject := b.prefix + ".order.changed"

			bad := tt.bad(b.prefix)
			bad.entityID = "bad"
			bad.subject = cmpOr(bad.subject, subject)
			bad.eventType = cmpOr(bad.eventType, "Changed")
			bad.data = cmpOr(bad.data, `{}`)
			b.insertRow(t, bad)
			b.insertRow(t, storedRow{subject: subject, eventType: "Changed", entityID: "bad", data: `{"next":1}`})
			others := changes(subject, 3, 2)
			b.write(t, others...)

			testenv.Eventually(t, 15*time.Second, func() bool {
				return b.db.Count(t, "FAILED") == 1 && b.db.Count(t, "SUCCESS") == len(others)
			}, "the unpublishable row FAILED and the other entities SUCCESS")
			var failed struct {
				Attempts  int    `db:"attempts"`
				LastError string `db:"last_error"`
			}
			require.NoError(t, b.db.Get(&failed, `SELECT attempts, last_error FROM events WHERE event_status = 'FAILED'`))
			require.Equal(t, 1, failed.Attempts, "refused at once, not retried")
			require.Contains(t, failed.LastError, tt.reason)
			require.Less(t, len(failed.LastError), 500, "last_error quotes no huge value")
			require.Equal(t, 1, b.db.Int(t, `SELECT count(*) FROM events
				WHERE entity_id = 'bad' AND event_status = 'READY' AND attempts = 0`), "the entity's next event waits")
			require.Zero(t, p.Stats().Backoffs, "a refusal is not an outage")
			require.False(t, b.nc.IsClosed(), "the connection is still open")
			msgs := b.received(t)
			requireOnceInOrder(t, msgs, len(others))
			for _, m := range msgs {
				require.NotEqual(t, "bad", m.Headers().Get(outbox.HeaderEntityID), "nothing of the blocked entity is sent")
			}
		})
	}
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// A compact JSON array of 350,000 zeros (700,001 bytes) fits the default
// 1 MiB with the publisher's headers, and is published as written (as
// jsonb it grew to 1,050,001 bytes and was FAILED).
func TestLargeArrayPublishes(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.start(t, fastConfig())
	data := "[" + strings.Repeat("0,", 349_999) + "0]"
	require.Len(t, data, 700_001)
	b.write(t, outbox.Event{EntityType: "order", EntityID: "big", Type: "Changed",
		Subject: b.prefix + ".order.changed", Data: json.RawMessage(data)})
	testenv.Eventually(t, 15*time.Second, func() bool {
		return b.db.Count(t, "SUCCESS")+b.db.Count(t, "FAILED") == 1
	}, "the event is published or FAILED")
	var lastError *string
	require.NoError(t, b.db.Get(&lastError, `SELECT last_error FROM events`))
	require.Equal(t, 1, b.db.Count(t, "SUCCESS"), "last_error: %s", derefOr(lastError))
	msgs := b.received(t)
	require.Len(t, msgs, 1)
	require.Len(t, msgs[0].Data(), 700_001)
}

func derefOr(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// A connection the server closes for a protocol error is closed for good
// (nats.go does not reconnect it): Run returns ErrNATSClosed instead of
// backing off forever, and a Poller on a new connection publishes what was
// written meanwhile.
func TestClosedConnectionStopsRun(t *testing.T) {
	t.Parallel()
	srv := testenv.StartNATSServer(t, nil)
	nc, js := srv.Connect(t)
	b := newBundle(t, nc, js)
	b.prefix = "p" + testenv.Suffix()
	b.stream = b.createStream(t, jetstream.StreamConfig{
		Subjects: []string{b.prefix + ".>"}, Storage: jetstream.MemoryStorage, Duplicates: 2 * time.Minute,
	})
	subject := b.prefix + ".order.changed"
	cfg := fastConfig()
	cfg.DB, cfg.DSN, cfg.NATS, cfg.Logger = b.db.DB.DB, b.db.DSN, nc, testLogger(t)
	p, err := poller.New(cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()

	before := changes(subject, 2, 3)
	b.write(t, before...)
	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(before) },
		"events SUCCESS before the close")

	// A protocol line over max_control_line: the server answers -ERR and
	// closes the connection.
	require.NoError(t, nc.Publish("bh01."+strings.Repeat("a", 5000), nil))
	select {
	case err := <-done:
		require.ErrorIs(t, err, poller.ErrNATSClosed)
		require.ErrorContains(t, err, "maximum control line")
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return after the server closed the connection")
	}
	require.True(t, nc.IsClosed())

	after := changes(subject, 2, 3)
	b.write(t, after...)
	nc2, js2 := srv.Connect(t)
	b.js, cfg.NATS = js2, nc2
	b.stream, err = js2.Stream(context.Background(), b.stream.CachedInfo().Config.Name)
	require.NoError(t, err)
	b.start(t, cfg)
	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(before)+len(after) },
		"events written after the close SUCCESS on a new connection")
	requireOnceInOrder(t, b.received(t), len(before)+len(after))
}
