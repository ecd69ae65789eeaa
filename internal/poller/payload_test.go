package poller_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// TestPayloadsReachConsumersByteForByte: what a consumer receives, from
// the publish loop and from a replay, is exactly what Write was given,
// JSON or not, and History returns the same bytes.
func TestPayloadsReachConsumersByteForByte(t *testing.T) {
	t.Parallel()
	b := setup(t)
	ctx := context.Background()
	subject := b.prefix + ".order.changed"
	// jsonb would reorder the keys, drop the first "alpha", print 1E2 as
	// 100, decode the escape and add spaces.
	jsonPayload := `{"zeta":1,"alpha":2,"alpha":3,"n":1E2,"s":"\u00e9","f":1.50}`
	protoPayload := []byte{0x08, 0x96, 0x01, 0x12, 0x00, 0xff, 0xfe}
	b.write(t,
		outbox.Event{EntityType: "order", EntityID: "o-1", Type: "Changed", Subject: subject,
			Data: json.RawMessage(jsonPayload)},
		outbox.Event{EntityType: "order", EntityID: "o-1", Type: "Changed", Subject: subject,
			Data: protoPayload, ContentType: "application/x-protobuf"},
	)
	want := []struct {
		data        []byte
		contentType string
	}{{[]byte(jsonPayload), ""}, {protoPayload, "application/x-protobuf"}}

	b.start(t, fastConfig())
	testenv.Eventually(t, 30*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(want) },
		"both events SUCCESS")

	history, err := outbox.History(ctx, b.db, "order", "o-1")
	require.NoError(t, err)
	require.Len(t, history, len(want))
	for i, w := range want {
		require.Equal(t, w.data, history[i].Data, "History of event %d", i)
		require.Equal(t, w.contentType, history[i].ContentType, "History of event %d", i)
	}

	res, err := poller.Replay(ctx, b.db.DB.DB, b.js, "events", poller.ReplayFilter{EntityType: "order", EntityID: "o-1"},
		poller.ReplayOptions{RunID: "bytes"}, nil)
	require.NoError(t, err)
	require.EqualValues(t, len(want), res.Published)

	msgs := b.received(t)
	require.Len(t, msgs, 2*len(want), "published, then replayed")
	for i, m := range msgs {
		w := want[i%len(want)]
		require.Equal(t, w.data, m.Data(), "payload of message %d", i)
		require.Equal(t, w.contentType, m.Headers().Get(outbox.HeaderContentType), "Content-Type of message %d", i)
	}
}

// A role or database that sets bytea_output = 'escape' (the format before
// PostgreSQL 9.0, kept by some old installations) changes how payloads are
// read back as text: the consumer and History still get the bytes written,
// backslashes, quotes, NUL and high bytes included.
func TestPayloadsRoundTripWithEscapeByteaOutput(t *testing.T) {
	t.Parallel()
	b := setup(t)
	dsn := b.db.DSN + "&bytea_output=escape"
	db, err := sqlx.Open("postgres", dsn)
	require.NoError(t, err)
	t.Cleanup(func() { db.Close() })
	payload := []byte{0, 1, '\\', 'x', '\\', '\\', 0xff, 0x80, '\'', '"', '\n', '\r', 200}
	tx, err := db.Beginx()
	require.NoError(t, err)
	_, err = b.w.Write(t.Context(), tx, outbox.Event{EntityType: "order", EntityID: "1", Type: "Changed",
		Subject: b.prefix + ".order.changed", Data: payload, ContentType: "application/octet-stream"})
	require.NoError(t, err)
	require.NoError(t, tx.Commit())
	cfg := fastConfig()
	cfg.DB, cfg.DSN = db.DB, dsn
	b.start(t, cfg)
	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == 1 }, "published")
	require.Equal(t, payload, b.received(t)[0].Data(), "bytes the consumer received")
	history, err := outbox.History(t.Context(), db, "order", "1")
	require.NoError(t, err)
	require.Equal(t, payload, history[0].Data, "bytes History returned")
}
