package poller_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
)

// A stream created with no_ack stores what it is sent but never answers,
// so the publisher cannot learn that an event was stored. It must not send
// the event again and again for ever (each time past the duplicate window
// a new copy is stored, and the event stays READY with nothing saying
// why): the event should end FAILED with the reason, found before sending.
func TestNoAckStreamDoesNotStoreAnEventOverAndOver(t *testing.T) {
	t.Parallel()
	b := setup(t)
	subject := "na" + testenv.Suffix()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s := b.createStream(t, jetstream.StreamConfig{Subjects: []string{subject + ".>"}, NoAck: true,
		Storage: jetstream.MemoryStorage, Duplicates: time.Second})
	cfg := fastConfig()
	cfg.AckTimeout = 300 * time.Millisecond
	b.start(t, cfg)
	b.write(t, ofEntities(subject+".order.changed", "x")...)
	b.write(t, ofEntities(b.prefix+".order.changed", "y")...) // its own stream acknowledges
	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "READY") == 0 },
		"the event leaves READY (FAILED with a reason, since no ack can come)")
	var lastError string
	require.NoError(t, b.db.Get(&lastError, `SELECT last_error FROM events WHERE event_status = 'FAILED'`))
	require.Contains(t, lastError, "no_ack")
	require.Equal(t, 1, b.db.Count(t, "SUCCESS"), "the other stream's event is published")
	info, err := s.Info(ctx)
	require.NoError(t, err)
	require.Zero(t, info.State.Msgs, "copies of the event stored: it is refused before sending")
}
