package poller_test

import (
	"bufio"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
	"time"

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

	srv.Start()
	testenv.Eventually(t, 30*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(events) },
		"all %d events SUCCESS once the broker is back", len(events))
	require.Zero(t, b.db.Int(t, `SELECT count(*) FROM events WHERE attempts > 0`), "an outage must not burn attempts")
	requireOnceInOrder(t, b.received(t), len(events))
}
