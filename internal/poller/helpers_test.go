package poller_test

import (
	"encoding/json"
	"log/slog"
	"testing"

	"github.com/pgnats/outbox/pkg/outbox"
)

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// ofEntities returns one "order" event on subject for each entity id, in
// order (an id given twice gets two events).
func ofEntities(subject string, ids ...string) []outbox.Event {
	events := make([]outbox.Event, 0, len(ids))
	for _, id := range ids {
		events = append(events, outbox.Event{EntityType: "order", EntityID: id, Type: "Changed", Subject: subject, Data: 1})
	}
	return events
}
