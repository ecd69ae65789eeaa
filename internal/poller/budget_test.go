package poller_test

import (
	"context"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// bigEvents returns n events of entity "big", each with a JSON string
// payload of size bytes.
func bigEvents(subject string, n, size int) []outbox.Event {
	payload := json.RawMessage(`"` + strings.Repeat("a", size-2) + `"`)
	events := make([]outbox.Event, n)
	for i := range events {
		events[i] = outbox.Event{EntityType: "order", EntityID: "big", Type: "Changed", Subject: subject, Data: payload}
	}
	return events
}

// A batch holds no more bytes of events than BatchBytes allows, whatever
// BatchSize says; all are published, in order.
func TestClaimKeepsToTheByteBudget(t *testing.T) {
	t.Parallel()
	b := setup(t)
	const n, size = 20, 300 << 10
	events := bigEvents(b.prefix+".order.changed", n, size)
	for i := 0; i < n; i += 5 {
		b.write(t, events[i:i+5]...)
	}
	var logs testenv.SyncBuffer
	cfg := fastConfig()
	cfg.BatchSize = 500
	cfg.BatchBytes = 1 << 20 // three of these events
	cfg.Logger = slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	b.start(t, cfg)
	testenv.Eventually(t, 30*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == n },
		"all %d events SUCCESS", n)

	var batches []int
	for _, l := range jsonLogs(t, logs.String()) {
		if l.Msg == "batch claimed" {
			batches = append(batches, l.Rows)
		}
	}
	t.Logf("rows per batch: %v", batches)
	for i, rows := range batches {
		require.LessOrEqual(t, rows, 3, "batch %d: %d events of %d bytes over a budget of %d", i, rows, size, cfg.BatchBytes)
	}
	requireOnceInOrder(t, b.received(t), n)
}

// A replay reads its events in pages of at most PageBytes, one page sent
// and acknowledged before the next is read.
func TestReplayPagesKeepToTheByteBudget(t *testing.T) {
	t.Parallel()
	b := setup(t)
	const n, size = 20, 300 << 10
	events := bigEvents(b.prefix+".order.changed", n, size)
	b.write(t, events...)
	_, err := b.db.Exec(`UPDATE events SET event_status = 'SUCCESS', published_at = now()`)
	require.NoError(t, err)

	pages := 0
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := poller.Replay(ctx, b.db.DB.DB, b.js, "events", poller.ReplayFilter{EntityType: "order", EntityID: "big"},
		poller.ReplayOptions{RunID: "pages", PageBytes: 1 << 20}, func(done, total int64) {
			if done > 0 {
				pages++
			}
		})
	require.NoError(t, err)
	require.EqualValues(t, n, res.Published)
	t.Logf("%d pages", pages)
	require.GreaterOrEqual(t, pages, n/3, "pages of at most three %d-byte events", size)
}
