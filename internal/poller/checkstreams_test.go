package poller_test

import (
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/internal/testenv"
)

func TestCheckStreams(t *testing.T) {
	t.Parallel()
	const (
		shortWindow = "stream's duplicate window is shorter than the publisher's retry horizon"
		noStream    = "no JetStream stream covers a subject the events table uses"
		noAck       = "stream is configured with no_ack"
	)
	// check runs CheckStreams with a one-minute horizon and returns what it
	// logged.
	check := func(t *testing.T, b *bundle, streams ...string) string {
		t.Helper()
		var logs testenv.SyncBuffer
		require.NoError(t, poller.CheckStreams(t.Context(), b.db.DB.DB, b.js, "events", time.Minute,
			slog.New(slog.NewTextHandler(&logs, nil)), streams...))
		return logs.String()
	}
	// shortStream creates a stream with a one-second duplicate window
	// covering "<prefix>.>" and returns its name and prefix.
	shortStream := func(t *testing.T, b *bundle) (string, string) {
		prefix := "t" + testenv.Suffix()
		s := b.createStream(t, jetstream.StreamConfig{Subjects: []string{prefix + ".>"},
			Storage: jetstream.MemoryStorage, Duplicates: time.Second})
		return s.CachedInfo().Config.Name, prefix
	}

	t.Run("short duplicate window of a stream only published rows use", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		name, prefix := shortStream(t, b)
		b.write(t, ofEntities(prefix+".order", "a")...)
		b.db.MustExec(`UPDATE events SET event_status = 'SUCCESS', published_at = now()`)

		logs := check(t, b)
		require.Contains(t, logs, shortWindow)
		require.Contains(t, logs, "stream="+name)
	})

	t.Run("subject of FAILED rows that no stream covers", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		subject := "nostream" + testenv.Suffix() + ".order"
		b.write(t, ofEntities(subject, "a")...)
		b.db.MustExec(`UPDATE events SET event_status = 'FAILED', attempts = 3`)

		logs := check(t, b)
		require.Contains(t, logs, noStream)
		require.Contains(t, logs, "subject="+subject)
	})

	t.Run("stream named at start with an empty table", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		name, _ := shortStream(t, b)

		logs := check(t, b, name)
		require.Contains(t, logs, shortWindow)
		require.Contains(t, logs, "stream="+name)
	})

	t.Run("no_ack stream covering a subject of READY rows", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		prefix := "na" + testenv.Suffix()
		s := b.createStream(t, jetstream.StreamConfig{Subjects: []string{prefix + ".>"}, NoAck: true,
			Storage: jetstream.MemoryStorage, Duplicates: 2 * time.Minute})
		b.write(t, ofEntities(prefix+".order", "a")...)

		logs := check(t, b)
		require.Contains(t, logs, noAck)
		require.Contains(t, logs, "stream="+s.CachedInfo().Config.Name)
		require.NotContains(t, logs, shortWindow)
	})

	t.Run("nothing to say about a long enough window", func(t *testing.T) {
		t.Parallel()
		b := setup(t) // its stream keeps two minutes
		b.write(t, ofEntities(b.prefix+".order", "a", "b")...)
		b.db.MustExec(`UPDATE events SET event_status = 'SUCCESS', published_at = now() WHERE seq = 1`)

		logs := check(t, b, b.stream.CachedInfo().Config.Name)
		require.Empty(t, strings.TrimSpace(logs))
	})
}
