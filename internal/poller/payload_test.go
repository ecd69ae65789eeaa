package poller_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

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
