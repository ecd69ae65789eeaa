package poller_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
)

// Acks that arrived are taken whatever came before them: a batch whose
// first messages get no ack by the deadline (a stream that never answers)
// still marks SUCCESS the later messages JetStream acknowledged, so the
// stuck stream does not hold the other streams' events back.
func TestAckedAfterAnUnansweredMessageAreMarked(t *testing.T) {
	t.Parallel()
	b := setup(t) // its stream, b.prefix, is the healthy one
	stuck := "s" + testenv.Suffix()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := b.js.CreateStream(ctx, jetstream.StreamConfig{Name: "STUCK_" + stuck, Subjects: []string{stuck + ".>"},
		Storage: jetstream.MemoryStorage, NoAck: true})
	require.NoError(t, err)
	t.Cleanup(func() { _ = b.js.DeleteStream(context.Background(), "STUCK_"+stuck) })

	// Many unanswered messages ahead of the healthy ones, in one batch.
	b.write(t, changes(stuck+".order.changed", 50, 1)...)
	healthy := changes(b.prefix+".order.changed", 5, 2)
	b.write(t, healthy...)
	cfg := fastConfig()
	cfg.AckTimeout = 300 * time.Millisecond
	cfg.BackoffMin, cfg.BackoffMax = 10*time.Millisecond, 50*time.Millisecond
	b.start(t, cfg)
	testenv.Eventually(t, 10*time.Second, func() bool {
		return b.db.Int(t, `SELECT count(*) FROM events WHERE event_status = 'SUCCESS' AND event_target LIKE $1`,
			b.prefix+".%") == len(healthy)
	}, "the %d acknowledged events behind the unanswered ones are marked", len(healthy))
}
