package wire_test

import (
	"cmp"
	"errors"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/wire"
)

func event() wire.Event {
	return wire.Event{ID: "0192a0c4-0000-7000-8000-000000000001", Seq: 7, Type: "Created",
		EntityType: "order", EntityID: "42", Data: []byte(`{}`), CreatedAt: time.Unix(1, 5)}
}

// Every header name byte nats.go refuses, the rule refuses, and no other:
// nats.go's Msg.Size counts no header block for a message it would refuse
// with ErrBadHeaderMsg.
func TestValidHeaderNameMatchesClient(t *testing.T) {
	for c := 0; c < 256; c++ {
		k := "a" + string([]byte{byte(c)}) + "b"
		m := &nats.Msg{Subject: "s", Header: nats.Header{k: {"v"}}}
		require.Equal(t, m.Size() > 1, wire.ValidHeaderName(k), "byte %#x", c)
	}
	for _, k := range []string{"x-tenant/id", "user@org", "a=b", "{k}", "a b", "a:b", ""} {
		require.False(t, wire.ValidHeaderName(k), k)
	}
}

// HeaderSize is nats.go's own count, values trimmed as the client trims
// them.
func TestHeaderSizeMatchesClient(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for range 200 {
		h := nats.Header{}
		for range r.IntN(6) {
			v := strings.Repeat(" ", r.IntN(3)) + strings.Repeat("é", r.IntN(50)) + strings.Repeat("\t", r.IntN(2))
			h.Add("K"+strings.Repeat("x", r.IntN(20)), v)
		}
		m := &nats.Msg{Subject: "s", Header: h, Data: []byte("data")}
		require.Equal(t, m.Size()-len("s")-len("data"), wire.HeaderSize(h))
	}
}

func TestBuild(t *testing.T) {
	long := func(n int) string { return strings.Repeat("a", n) }
	for _, tc := range []struct {
		name  string
		edit  func(*wire.Event)
		field string // "" = accepted
	}{
		{"plain event", func(*wire.Event) {}, ""},
		{"header name with slash", func(e *wire.Event) { e.Headers = map[string]string{"x-tenant/id": "1"} }, "Headers"},
		{"header name with at", func(e *wire.Event) { e.Headers = map[string]string{"user@org": "1"} }, "Headers"},
		{"header name with equals", func(e *wire.Event) { e.Headers = map[string]string{"a=b": "1"} }, "Headers"},
		{"header name with braces", func(e *wire.Event) { e.Headers = map[string]string{"{k}": "1"} }, "Headers"},
		{"reserved header", func(e *wire.Event) { e.Headers = map[string]string{"nats-expected-stream": "x"} }, "Headers"},
		{"header value with LF", func(e *wire.Event) { e.Headers = map[string]string{"k": "a\nb"} }, "Headers"},
		{"header value with a tab inside", func(e *wire.Event) { e.Headers = map[string]string{"k": "a\tb"} }, ""},
		{"header value with a leading space", func(e *wire.Event) { e.Headers = map[string]string{"k": " a"} }, "Headers"},
		{"header value with a trailing tab", func(e *wire.Event) { e.Headers = map[string]string{"k": "a\t"} }, "Headers"},
		{"header value with a no-break space", func(e *wire.Event) { e.Headers = map[string]string{"k": "a\u00a0"} }, ""},
		{"entity id with a trailing space", func(e *wire.Event) { e.EntityID = "42 " }, "EntityID"},
		{"header name holding the message id's", func(e *wire.Event) { e.Headers = map[string]string{"X-Nats-Msg-Id": "1"} }, "Headers"},
		{"header value holding the message id's name", func(e *wire.Event) { e.Headers = map[string]string{"A": "Nats-Msg-Id"} }, "Headers"},
		{"entity id holding the message id's name", func(e *wire.Event) { e.EntityID = "Nats-Msg-Id" }, "EntityID"},
		{"replay run id with a trailing space", func(e *wire.Event) { e.Replay = "r " }, "Replay"},
		{"entity id at its maximum", func(e *wire.Event) { e.EntityID = long(wire.MaxEntityID) }, ""},
		{"entity id over its maximum", func(e *wire.Event) { e.EntityID = long(wire.MaxEntityID + 1) }, "EntityID"},
		{"entity type over its maximum", func(e *wire.Event) { e.EntityType = long(wire.MaxEntityType + 1) }, "EntityType"},
		{"type over its maximum", func(e *wire.Event) { e.Type = long(wire.MaxType + 1) }, "Type"},
		{"entity id with NUL", func(e *wire.Event) { e.EntityID = "a\x00" }, "EntityID"},
		{"subject of 5000 bytes", func(e *wire.Event) { e.Subject = "bh01." + long(5000) }, "Subject"},
		{"subject with a wildcard", func(e *wire.Event) { e.Subject = "a.*" }, "Subject"},
		{"header block over 64 KiB", func(e *wire.Event) { e.Headers = map[string]string{"big": long(70_000)} }, "Headers"},
		{"payload at max_payload with headers", func(e *wire.Event) {
			m, _, err := wire.Build(*e, 0, 0)
			require.NoError(t, err)
			e.Data = make([]byte, wire.DefaultMaxPayload-wire.HeaderSize(m.Header))
		}, ""},
		{"payload one byte over max_payload with headers", func(e *wire.Event) {
			m, _, err := wire.Build(*e, 0, 0)
			require.NoError(t, err)
			e.Data = make([]byte, wire.DefaultMaxPayload-wire.HeaderSize(m.Header)+1)
		}, "Data"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ev := event()
			tc.edit(&ev)
			m, size, err := wire.Build(ev, 0, 0)
			if tc.field == "" {
				require.NoError(t, err)
				require.Equal(t, m.Size()-len(m.Subject), size)
				return
			}
			var werr *wire.Error
			require.True(t, errors.As(err, &werr), "%v", err)
			require.Equal(t, tc.field, werr.Field, werr.Reason)
		})
	}
}

// The control line is what bounds a subject: the longest accepted one
// makes a line of exactly the server's max_control_line, the default or
// one given.
func TestBuildControlLine(t *testing.T) {
	for _, limit := range []int{0, 1024} {
		ev := event()
		m, size, err := wire.Build(ev, 0, limit)
		require.NoError(t, err)
		hdr := wire.HeaderSize(m.Header)
		room := cmp.Or(limit, wire.DefaultMaxControlLine) - wire.ControlLine(0, hdr, size)
		ev.Subject = strings.Repeat("a", room)
		_, _, err = wire.Build(ev, 0, limit)
		require.NoError(t, err, "limit %d", limit)
		ev.Subject += "a"
		_, _, err = wire.Build(ev, 0, limit)
		require.ErrorContains(t, err, "max_control_line", "limit %d", limit)
	}
}

// Worst is never smaller than a real event's message.
func TestWorstBoundsRealMessages(t *testing.T) {
	ev := event()
	ev.Seq, ev.CreatedAt = 1, time.Date(2026, 1, 2, 3, 4, 5, 123456789, time.UTC)
	_, real, err := wire.Build(ev, 0, 0)
	require.NoError(t, err)
	_, worst, err := wire.Build(wire.Worst(ev), 0, 0)
	require.NoError(t, err)
	require.Greater(t, worst, real)
	// Ids are 36 bytes and this time has nine digits of nanoseconds, the
	// longest: only the seq differs, 19 digits against 1, and Worst is
	// the message as a replay sends it.
	ev.Replay = strings.Repeat("r", wire.ReplayRunIDLen)
	_, replayed, err := wire.Build(ev, 0, 0)
	require.NoError(t, err)
	require.Equal(t, 19-1, worst-replayed)
}
