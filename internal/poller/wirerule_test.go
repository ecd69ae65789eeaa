package poller_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/internal/wire"
	"github.com/pgnats/outbox/pkg/outbox"
)

// Values nats.go trims (leading or trailing spaces and tabs) would reach
// the consumer as another value, the entity id included: Write refuses
// them, and the publisher FAILs a stored row holding one instead of sending
// it altered.
func TestTrimmedHeaderValuesAreRefused(t *testing.T) {
	t.Parallel()
	b := setup(t)
	subject := b.prefix + ".order.changed"
	for _, ev := range []outbox.Event{
		{EntityType: "order", EntityID: "42 ", Type: "Changed", Subject: subject, Data: json.RawMessage(`{}`)},
		{EntityType: "order", EntityID: "42", Type: "\tChanged", Subject: subject, Data: json.RawMessage(`{}`)},
		{EntityType: "order", EntityID: "42", Type: "Changed", Subject: subject, Data: json.RawMessage(`{}`),
			Headers: map[string]string{"X-Note": "v "}},
	} {
		tx, err := b.db.Beginx()
		require.NoError(t, err)
		_, err = b.w.Write(context.Background(), tx, ev)
		require.NoError(t, tx.Rollback())
		require.ErrorIs(t, err, outbox.ErrInvalidEvent, "%+v", ev)
	}
	b.insertRow(t, storedRow{subject: subject, eventType: "Changed", entityID: "7", data: `{}`,
		headers: map[string]string{"X-Note": "\tv"}})
	b.start(t, fastConfig())
	testenv.Eventually(t, 15*time.Second, func() bool {
		return b.db.Count(t, "FAILED")+b.db.Count(t, "SUCCESS") == 1
	}, "the stored row is FAILED or published")
	var lastError string
	require.NoError(t, b.db.Get(&lastError, `SELECT coalesce(last_error, '') FROM events`))
	require.Equal(t, 1, b.db.Count(t, "FAILED"), "published altered: %v", headersOf(b.received(t)))
	require.Contains(t, lastError, "trims")
}

func headersOf(msgs []jetstream.Msg) []nats.Header {
	var out []nats.Header
	for _, m := range msgs {
		out = append(out, m.Headers())
	}
	return out
}

// nats-server 2.9 looks the message id up as the first occurrence of
// "Nats-Msg-Id" in the header block: a user header holding that text and
// encoded before the real one hides the id, and an event sent again (after a
// crash before its mark committed) is stored twice. Write refuses such
// headers; stored rows holding one are FAILED rather than sent.
func TestMsgIDTextInHeadersDoesNotDefeatDedup(t *testing.T) {
	t.Parallel()
	b := setup(t)
	subject := b.prefix + ".order.changed"
	const n = 16
	for i := range n {
		h := map[string]string{"X-Nats-Msg-Id": "1"}
		if i%2 == 1 {
			h = map[string]string{"A": "Nats-Msg-Id"}
		}
		tx, err := b.db.Beginx()
		require.NoError(t, err)
		_, err = b.w.Write(context.Background(), tx, outbox.Event{EntityType: "order", EntityID: "1", Type: "Changed",
			Subject: subject, Data: json.RawMessage(`{}`), Headers: h})
		require.NoError(t, tx.Rollback())
		require.ErrorIs(t, err, outbox.ErrInvalidEvent, "%v", h)
		b.insertRow(t, storedRow{subject: subject, eventType: "Changed", entityID: fmt.Sprint(i), data: `{}`, headers: h})
	}
	b.start(t, fastConfig())
	done := func() bool { return b.db.Count(t, "SUCCESS")+b.db.Count(t, "FAILED") == n }
	testenv.Eventually(t, 15*time.Second, done, "every row published or FAILED")
	sent := b.db.Count(t, "SUCCESS")
	// Sent again, as after a crash before the marks committed.
	b.db.MustExec(`UPDATE events SET event_status = 'READY' WHERE event_status = 'SUCCESS'`)
	testenv.Eventually(t, 15*time.Second, done, "every row published or FAILED again")
	require.Len(t, b.received(t), sent, "the broker deduplicated every resend")
	require.Equal(t, n, b.db.Count(t, "FAILED"))
}

// Every event Write accepts can be replayed: the replay's message id and
// Outbox-Replay header are within Write's budget.
func TestReplayOfLargestEvent(t *testing.T) {
	t.Parallel()
	b := setup(t)
	subject := b.prefix + ".order.changed"
	ev := outbox.Event{EntityType: "order", EntityID: "1", Type: "Changed", Subject: subject,
		ContentType: "application/octet-stream", Data: []byte{}}
	_, hdr, err := wire.Build(wire.Worst(wire.Event{Subject: subject, Type: ev.Type, EntityType: ev.EntityType,
		EntityID: ev.EntityID, Headers: map[string]string{outbox.HeaderContentType: ev.ContentType}}), 0, 0)
	require.NoError(t, err)
	ev.Data = make([]byte, wire.DefaultMaxPayload-hdr+1)
	tx, err := b.db.Beginx()
	require.NoError(t, err)
	_, err = b.w.Write(context.Background(), tx, ev)
	require.NoError(t, tx.Rollback())
	require.ErrorIs(t, err, outbox.ErrInvalidEvent, "one byte more is refused")
	ev.Data = make([]byte, wire.DefaultMaxPayload-hdr)
	b.write(t, ev)
	b.start(t, fastConfig())
	testenv.Eventually(t, 15*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == 1 }, "published")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	res, err := poller.Replay(ctx, b.db.DB.DB, b.js, "events", poller.ReplayFilter{FromSeq: 1},
		poller.ReplayOptions{RunID: "r1", AckTimeout: 5 * time.Second}, nil)
	require.NoError(t, err)
	require.EqualValues(t, 1, res.Published)
}

// A replay whose subject prefix makes the protocol line too long stops with
// the reason before sending: sent, it made the server close the connection.
func TestReplayPrefixTooLongIsRefused(t *testing.T) {
	t.Parallel()
	b := setup(t)
	subject := b.prefix + ".order." + strings.Repeat("a", 3900)
	b.write(t, outbox.Event{EntityType: "order", EntityID: "1", Type: "Changed", Subject: subject, Data: json.RawMessage(`{}`)})
	b.start(t, fastConfig())
	testenv.Eventually(t, 15*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == 1 }, "published")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err := poller.Replay(ctx, b.db.DB.DB, b.js, "events", poller.ReplayFilter{FromSeq: 1},
		poller.ReplayOptions{RunID: "r1", SubjectPrefix: b.prefix + strings.Repeat("p", 300), AckTimeout: 5 * time.Second}, nil)
	require.ErrorContains(t, err, "max_control_line")
	require.Less(t, len(err.Error()), 1000, "the error quotes no huge subject")
	require.NoError(t, b.nc.FlushTimeout(5*time.Second), "the connection is still open")
}
