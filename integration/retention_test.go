package integration

import (
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
)

// TestProcessedRetention starts `publisher run --processed-retention` and
// checks the start-up refusal against the streams' max_age, and the
// deletion of old processed_message rows once it starts.
func TestProcessedRetention(t *testing.T) {
	t.Parallel()
	_, js := testenv.NATS(t)

	// withStream returns a bundle whose stream has maxAge, holding one
	// published event, so the stream covers a recent event's subject.
	withStream := func(t *testing.T, maxAge time.Duration) *bundle {
		prefix := "t" + testenv.Suffix()
		stream := createStream(t, js, jetstream.StreamConfig{Subjects: []string{prefix + ".>"}, MaxAge: maxAge})
		b := newBundle(t, js, stream, prefix)
		b.writeAll(t, []string{"a"}, 1)
		return b
	}

	t.Run("shorter than the stream's max_age is refused", func(t *testing.T) {
		t.Parallel()
		b := withStream(t, 48*time.Hour)
		p := startPublisher(t, "publisher", b.db.DSN, "--processed-retention", "24h")
		require.Equal(t, 2, p.Wait(t, 30*time.Second), "exit status; logs:\n%s", p.Logs())
		require.Contains(t, p.Logs(), "--processed-retention 24h0m0s")
		require.Contains(t, p.Logs(), "stream "+b.stream)
		require.Contains(t, p.Logs(), "set --processed-retention to at least 48h0m0s")
	})

	t.Run("any finite retention is refused for a stream without max_age", func(t *testing.T) {
		t.Parallel()
		b := withStream(t, 0)
		p := startPublisher(t, "publisher", b.db.DSN, "--processed-retention", "8760h")
		require.Equal(t, 2, p.Wait(t, 30*time.Second), "exit status; logs:\n%s", p.Logs())
		require.Contains(t, p.Logs(), "max_age 0 (unlimited)")
		require.Contains(t, p.Logs(), "set --processed-retention 0")
	})

	t.Run("at least the max_age starts and deletes old rows", func(t *testing.T) {
		t.Parallel()
		b := withStream(t, time.Hour)
		_, err := b.db.Exec(`INSERT INTO processed_message (consumer_id, message_id, processed_at)
			SELECT 'billing', 'old-' || i, now() - interval '3 hours' FROM generate_series(1, 1500) i`)
		require.NoError(t, err)
		_, err = b.db.Exec(`INSERT INTO processed_message (consumer_id, message_id) VALUES ('billing', 'new')`)
		require.NoError(t, err)
		startPublisher(t, "publisher", b.db.DSN, "--processed-retention", "2h", "--retention-schedule", "@every 1s")
		b.waitAllSuccess(t, 1, 30*time.Second)
		testenv.Eventually(t, 30*time.Second, func() bool {
			return b.db.Int(t, `SELECT count(*) FROM processed_message`) == 1
		}, "old processed_message rows deleted")
		require.Equal(t, 1, b.db.Int(t, `SELECT count(*) FROM processed_message WHERE message_id = 'new'`))
		require.Equal(t, 1, b.db.Count(t, "SUCCESS"), "events are kept without --retention")
	})

	t.Run("negative retention is a usage error", func(t *testing.T) {
		t.Parallel()
		r := cli(t, "run", "--processed-retention", "-1h", "--database-url", unreachableDSN)
		require.Equal(t, 2, r.code, "stderr:\n%s", r.stderr)
		require.Contains(t, r.stderr, "--processed-retention must not be negative")
	})
}
