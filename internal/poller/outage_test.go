package poller_test

import (
	"bufio"
	"context"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
)

// logLine is one line of a JSON log, with the attributes tests read.
type logLine struct {
	Msg     string        `json:"msg"`
	Backoff time.Duration `json:"backoff"` // slog's JSON handler writes nanoseconds
	Rows    int           `json:"rows"`
}

// jsonLogs returns the lines of a JSON log written at debug level.
func jsonLogs(t *testing.T, out string) []logLine {
	t.Helper()
	var lines []logLine
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var l logLine
		require.NoError(t, json.Unmarshal(sc.Bytes(), &l), "log line %q", sc.Text())
		lines = append(lines, l)
	}
	return lines
}

// While the broker is down, the loop's back-off grows to BackoffMax and
// stays there, and it claims no batch (locking rows) until the broker
// answers again; nothing is lost once it does.
func TestBrokerOutageBacksOffToTheMaxWithoutClaiming(t *testing.T) {
	t.Parallel()
	b, srv := setupServer(t)
	var logs testenv.SyncBuffer
	cfg := fastConfig()
	cfg.BackoffMin, cfg.BackoffMax = 10*time.Millisecond, 400*time.Millisecond
	cfg.Logger = slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	p := b.start(t, cfg)
	testenv.Eventually(t, 10*time.Second, func() bool { return p.Stats().Leader }, "the poller leads")

	srv.Stop()
	events := changes(b.prefix+".order.changed", 5, 10)
	b.write(t, events...)
	testenv.Eventually(t, 10*time.Second, func() bool { return p.Stats().Backoffs >= 1 },
		"the loop backs off once the broker is down")
	from := len(logs.String())
	// Watch the outage for ten times the longest back-off.
	time.Sleep(10 * cfg.BackoffMax)
	window := jsonLogs(t, logs.String()[from:])

	var (
		claims   int
		backoffs []time.Duration
	)
	for _, l := range window {
		switch l.Msg {
		case "batch claimed":
			claims++
		case "publish loop backing off":
			backoffs = append(backoffs, l.Backoff)
		}
	}
	t.Logf("during the outage: %d claims, %d back-offs, the first %v", claims, len(backoffs), backoffs[:min(len(backoffs), 8)])
	require.LessOrEqual(t, claims, 1, "batches claimed while the broker was down")
	require.GreaterOrEqual(t, len(backoffs), 5, "back-offs in the window")
	require.Less(t, len(backoffs), 40, "back-offs in the window: they must grow, not stay at the minimum")
	for _, d := range backoffs[len(backoffs)-3:] {
		// With full jitter a back-off of d waits between d/2 and d.
		require.GreaterOrEqual(t, d, cfg.BackoffMax/2, "the back-off grew to its maximum and stays there")
	}
	require.Zero(t, b.db.Count(t, "SUCCESS"))
	require.Nil(t, p.Fault(), "a broker outage is not a lasting database error")

	srv.Start()
	testenv.Eventually(t, 30*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(events) },
		"all %d events SUCCESS once the broker is back", len(events))
	require.Zero(t, b.db.Int(t, `SELECT count(*) FROM events WHERE attempts > 0`), "an outage must not burn attempts")
	requireOnceInOrder(t, b.received(t), len(events))
}

// One stream that cannot store (full under DiscardNew, a subject at its
// per-subject limit) must not stop events bound for other streams: they
// are other entities on other subjects, and nothing stops the broker from
// storing them. (A stream configured with no_ack, which never acks, has
// its events FAILED before sending: TestNoAckStreamDoesNotStoreAnEventOverAndOver.)
func TestOneStuckStreamDoesNotStallOthers(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		cfg  jetstream.StreamConfig
		fill int // messages stored in the stuck stream before the test
	}{
		{"full under DiscardNew", jetstream.StreamConfig{MaxMsgs: 1, Discard: jetstream.DiscardNew}, 1},
		{"subject at its per-subject limit", jetstream.StreamConfig{MaxMsgsPerSubject: 1,
			Discard: jetstream.DiscardNew, DiscardNewPerSubject: true}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := setup(t) // its stream, b.prefix, is the healthy one
			stuck := "s" + testenv.Suffix()
			cfg := tc.cfg
			cfg.Name = "STUCK_" + stuck
			cfg.Subjects = []string{stuck + ".>"}
			cfg.Storage = jetstream.MemoryStorage
			cfg.Duplicates = time.Minute
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := b.js.CreateStream(ctx, cfg)
			require.NoError(t, err)
			t.Cleanup(func() { _ = b.js.DeleteStream(context.Background(), cfg.Name) })
			for range tc.fill {
				_, err := b.js.Publish(ctx, stuck+".order.changed", []byte("{}"))
				require.NoError(t, err)
			}

			pcfg := fastConfig()
			pcfg.AckTimeout = 500 * time.Millisecond
			p := b.start(t, pcfg)
			b.write(t, ofEntities(stuck+".order.changed", "stuck", "stuck")...)
			testenv.Eventually(t, 15*time.Second, func() bool { return p.Stats().Backoffs >= 2 },
				"the loop backs off on the stuck stream")
			healthy := changes(b.prefix+".order.changed", 5, 2)
			b.write(t, healthy...)
			testenv.Eventually(t, 15*time.Second, func() bool {
				return b.db.Int(t, `SELECT count(*) FROM events WHERE event_status = 'SUCCESS' AND event_target LIKE $1`,
					b.prefix+".%") == len(healthy)
			}, "the %d events for the healthy stream are published", len(healthy))
			require.Equal(t, 2, b.db.Int(t, `SELECT count(*) FROM events WHERE event_status = 'READY' AND attempts = 0
				AND event_target LIKE $1`, stuck+".%"), "the stuck stream's events wait, READY, no attempt burnt")
		})
	}
}
