package outbox_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/wire"
	"github.com/pgnats/outbox/pkg/outbox"
)

// validEvent returns an event that passes validation.
func validEvent() outbox.Event {
	return outbox.Event{
		EntityType: "order",
		EntityID:   "o-1",
		Type:       "OrderCreated",
		Data:       json.RawMessage(`{"id":"o-1"}`),
	}
}

func TestWriteRejectsInvalidEvent(t *testing.T) {
	t.Parallel()

	with := func(f func(*outbox.Event)) outbox.Event {
		ev := validEvent()
		f(&ev)
		return ev
	}
	subject := func(s string) outbox.Event { return with(func(e *outbox.Event) { e.Subject = s }) }
	data := func(d any) outbox.Event { return with(func(e *outbox.Event) { e.Data = d }) }
	header := func(k, v string) outbox.Event {
		return with(func(e *outbox.Event) { e.Headers = map[string]string{"traceparent": "00-1", k: v} })
	}
	// jsonString is a JSON string of n bytes with its quotes.
	jsonString := func(n int) json.RawMessage { return json.RawMessage(`"` + strings.Repeat("x", n-2) + `"`) }

	tests := []struct {
		name     string
		maxBytes int
		event    outbox.Event
		field    string
	}{
		{name: "EntityType empty", event: with(func(e *outbox.Event) { e.EntityType = "" }), field: "EntityType"},
		{name: "EntityType with CR", event: with(func(e *outbox.Event) { e.EntityType = "ord\rer" }), field: "EntityType"},
		{name: "EntityType with space makes default subject invalid", event: with(func(e *outbox.Event) { e.EntityType = "order item" }), field: "Subject (from EntityType.Type)"},
		{name: "EntityID empty", event: with(func(e *outbox.Event) { e.EntityID = "" }), field: "EntityID"},
		{name: "EntityID with newline", event: with(func(e *outbox.Event) { e.EntityID = "o-1\n" }), field: "EntityID"},
		{name: "EntityID with NUL", event: with(func(e *outbox.Event) { e.EntityID = "o\x001" }), field: "EntityID"},
		{name: "EntityID invalid UTF-8", event: with(func(e *outbox.Event) { e.EntityID = "o-\xff" }), field: "EntityID"},
		{name: "Type empty", event: with(func(e *outbox.Event) { e.Type = "" }), field: "Type"},
		{name: "Type with wildcard makes default subject invalid", event: with(func(e *outbox.Event) { e.Type = "Order*" }), field: "Subject (from EntityType.Type)"},
		{name: "Type with trailing dot makes default subject invalid", event: with(func(e *outbox.Event) { e.Type = "Created." }), field: "Subject (from EntityType.Type)"},

		{name: "Subject with space", event: subject("a b"), field: "Subject"},
		{name: "Subject with star wildcard token", event: subject("a.*"), field: "Subject"},
		{name: "Subject with full wildcard token", event: subject("a.>"), field: "Subject"},
		{name: "Subject with star inside token", event: subject("a.b*c"), field: "Subject"},
		{name: "Subject with double dot", event: subject("a..b"), field: "Subject"},
		{name: "Subject with leading dot", event: subject(".a"), field: "Subject"},
		{name: "Subject with trailing dot", event: subject("a."), field: "Subject"},
		{name: "Subject only a dot", event: subject("."), field: "Subject"},
		{name: "Subject with newline", event: subject("a\n"), field: "Subject"},
		{name: "Subject with tab", event: subject("a\tb"), field: "Subject"},
		{name: "Subject with control char", event: subject("a\x01b"), field: "Subject"},
		{name: "Subject with DEL", event: subject("a\x7fb"), field: "Subject"},
		{name: "Subject with non-breaking space", event: subject("a\u00a0b"), field: "Subject"},
		{name: "Subject invalid UTF-8", event: subject("a.\xff"), field: "Subject"},

		{name: "Data nil", event: data(nil), field: "Data"},
		{name: "Data nil RawMessage", event: data(json.RawMessage(nil)), field: "Data"},
		{name: "Data RawMessage invalid JSON", event: data(json.RawMessage(`{"a":`)), field: "Data"},
		{name: "Data bytes invalid JSON", event: data([]byte("not json")), field: "Data"},
		{name: "Data bytes empty", event: data([]byte{}), field: "Data"},
		{name: "Data unmarshalable value", event: data(make(chan int)), field: "Data"},
		{name: "Data JSON invalid UTF-8", event: data([]byte("\"\xff\"")), field: "Data"},
		{name: "Data JSON content type invalid JSON", event: with(func(e *outbox.Event) {
			e.ContentType, e.Data = "application/cloudevents+json; charset=utf-8", []byte("not json")
		}), field: "Data"},
		{name: "Data non-JSON content type not bytes", event: with(func(e *outbox.Event) {
			e.ContentType, e.Data = "application/protobuf", map[string]int{"a": 1}
		}), field: "Data"},
		{name: "Data non-JSON content type nil", event: with(func(e *outbox.Event) {
			e.ContentType, e.Data = "application/protobuf", nil
		}), field: "Data"},
		{name: "Content-Type header twice in different case", event: with(func(e *outbox.Event) {
			e.Headers, e.Data = map[string]string{"Content-Type": "application/json", "content-type": "application/octet-stream"}, []byte{0xff}
		}), field: "Headers"},
		{name: "Content-Type header twice, one agreeing with ContentType", event: with(func(e *outbox.Event) {
			e.ContentType, e.Headers, e.Data = "application/protobuf",
				map[string]string{"Content-Type": "application/protobuf", "CONTENT-TYPE": "application/avro"}, []byte{1}
		}), field: "Headers"},
		{name: "ContentType disagrees with its header", event: with(func(e *outbox.Event) {
			e.ContentType, e.Headers, e.Data = "application/protobuf", map[string]string{"content-type": "application/avro"}, []byte{1}
		}), field: "ContentType"},
		// A valid event's message is under 300 bytes with the publisher's
		// headers.
		{name: "Data over Config.MaxBytes", maxBytes: 400, event: data(jsonString(200)), field: "Data"},
		{name: "Headers count toward Config.MaxBytes", maxBytes: 400, event: with(func(e *outbox.Event) {
			e.Headers = map[string]string{"big": strings.Repeat("v", 150)}
		}), field: "Data"},
		{name: "Data over default 1 MiB", event: data(jsonString(outbox.DefaultMaxBytes)), field: "Data"},

		{name: "Headers reserved Nats-Msg-Id", event: header("Nats-Msg-Id", "x"), field: "Headers"},
		{name: "Headers reserved nats-msg-id lowercase", event: header("nats-msg-id", "x"), field: "Headers"},
		{name: "Headers reserved Nats- prefix", event: header("Nats-Expected-Stream", "x"), field: "Headers"},
		{name: "Headers reserved Outbox-Event-Id", event: header("Outbox-Event-Id", "x"), field: "Headers"},
		{name: "Headers reserved Outbox- prefix", event: header("Outbox-Anything", "x"), field: "Headers"},
		{name: "Headers key with colon", event: header("a:b", "x"), field: "Headers"},
		{name: "Headers key with space", event: header("a b", "x"), field: "Headers"},
		{name: "Headers key empty", event: header("", "x"), field: "Headers"},
		{name: "Headers key non-ASCII", event: header("é", "x"), field: "Headers"},
		{name: "Headers value with CRLF", event: header("k", "a\r\nb"), field: "Headers"},
		{name: "Headers value with NUL", event: header("k", "a\x00b"), field: "Headers"},
		{name: "Headers value invalid UTF-8", event: header("k", "\xff"), field: "Headers"},
	}
	ctx := context.Background()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			w, err := outbox.NewWriter(outbox.Config{MaxBytes: tt.maxBytes})
			require.NoError(t, err)

			for _, batch := range []struct {
				name   string
				events []outbox.Event
				index  int
			}{
				{"alone", []outbox.Event{tt.event}, 0},
				{"third of a batch", []outbox.Event{validEvent(), validEvent(), tt.event, validEvent()}, 2},
			} {
				// A nil transaction is only reached after validation: the
				// error must be the validation error.
				ids, err := w.Write(ctx, nil, batch.events...)
				require.Error(t, err, batch.name)
				require.Nil(t, ids, batch.name)
				require.ErrorIs(t, err, outbox.ErrInvalidEvent, batch.name)
				var verr *outbox.ValidationError
				require.True(t, errors.As(err, &verr), "%s: %T is not a *ValidationError", batch.name, err)
				require.Equal(t, tt.field, verr.Field, "%s: %v", batch.name, err)
				require.Equal(t, batch.index, verr.Index, "%s: %v", batch.name, err)
				require.NotEmpty(t, verr.Reason, batch.name)
			}
		})
	}
}

func TestWriteAcceptsValidEvent(t *testing.T) {
	t.Parallel()

	type order struct {
		ID    string `json:"id"`
		Total int    `json:"total"`
	}
	tests := []struct {
		name        string
		maxBytes    int
		event       outbox.Event
		wantSubject string
		wantData    string // exact bytes stored
		wantHeaders string
	}{
		{
			name:        "struct Data marshalled",
			event:       outbox.Event{EntityType: "order", EntityID: "o-1", Type: "OrderCreated", Data: order{ID: "o-1", Total: 42}},
			wantSubject: "order.OrderCreated",
			wantData:    `{"id":"o-1","total":42}`,
			wantHeaders: `{}`,
		},
		{
			name:        "RawMessage kept as-is",
			event:       outbox.Event{EntityType: "order", EntityID: "o-1", Type: "OrderCreated", Data: json.RawMessage(` { "b" : 1,  "a":2 } `)},
			wantSubject: "order.OrderCreated",
			wantData:    ` { "b" : 1,  "a":2 } `,
			wantHeaders: `{}`,
		},
		{
			name:        "bytes kept as-is",
			event:       outbox.Event{EntityType: "order", EntityID: "o-1", Type: "OrderCreated", Data: []byte(`[1, 2]`)},
			wantSubject: "order.OrderCreated",
			wantData:    `[1, 2]`,
			wantHeaders: `{}`,
		},
		{
			name:        "RawMessage null payload",
			event:       outbox.Event{EntityType: "order", EntityID: "o-1", Type: "OrderCreated", Data: json.RawMessage(`null`)},
			wantSubject: "order.OrderCreated",
			wantData:    `null`,
			wantHeaders: `{}`,
		},
		{
			name:        "string Data marshalled as JSON string",
			event:       outbox.Event{EntityType: "order", EntityID: "o-1", Type: "OrderCreated", Data: "hello"},
			wantSubject: "order.OrderCreated",
			wantData:    `"hello"`,
			wantHeaders: `{}`,
		},
		{
			name:        "JSON escaped backslash before u0000 is a literal backslash",
			event:       outbox.Event{EntityType: "order", EntityID: "o-1", Type: "OrderCreated", Data: json.RawMessage(`{"path":"C:\\u0000"}`)},
			wantSubject: "order.OrderCreated",
			wantData:    `{"path":"C:\\u0000"}`,
			wantHeaders: `{}`,
		},
		{
			name:        "JSON surrogate pair",
			event:       outbox.Event{EntityType: "order", EntityID: "o-1", Type: "OrderCreated", Data: json.RawMessage(`"\ud83d\ude00 \u00e9"`)},
			wantSubject: "order.OrderCreated",
			wantData:    `"\ud83d\ude00 \u00e9"`,
			wantHeaders: `{}`,
		},
		{
			name:        "explicit Subject overrides default",
			event:       outbox.Event{EntityType: "order", EntityID: "o-1", Type: "OrderCreated", Subject: "shop.orders.created", Data: json.RawMessage(`{}`)},
			wantSubject: "shop.orders.created",
			wantData:    `{}`,
			wantHeaders: `{}`,
		},
		{
			name:        "Type with dot extends default subject",
			event:       outbox.Event{EntityType: "order", EntityID: "o-1", Type: "v2.Created", Data: json.RawMessage(`{}`)},
			wantSubject: "order.v2.Created",
			wantData:    `{}`,
			wantHeaders: `{}`,
		},
		{
			name:        "EntityID with spaces and dots",
			event:       outbox.Event{EntityType: "order", EntityID: "o 1.2", Type: "OrderCreated", Data: json.RawMessage(`{}`)},
			wantSubject: "order.OrderCreated",
			wantData:    `{}`,
			wantHeaders: `{}`,
		},
		{
			name: "Headers marshalled",
			event: outbox.Event{EntityType: "order", EntityID: "o-1", Type: "OrderCreated", Data: json.RawMessage(`{}`),
				Headers: map[string]string{"traceparent": "00-abc-01", "X-Tenant": "acme corp"}},
			wantSubject: "order.OrderCreated",
			wantData:    `{}`,
			wantHeaders: `{"X-Tenant":"acme corp","traceparent":"00-abc-01"}`,
		},
		{
			name:        "event exactly Config.MaxBytes",
			maxBytes:    worstSize(t, outbox.Event{EntityType: "a", EntityID: "o-1", Type: "b", Data: json.RawMessage(`"12345678"`)}),
			event:       outbox.Event{EntityType: "a", EntityID: "o-1", Type: "b", Data: json.RawMessage(`"12345678"`)},
			wantSubject: "a.b",
			wantData:    `"12345678"`,
			wantHeaders: `{}`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			w, err := outbox.NewWriter(outbox.Config{MaxBytes: tt.maxBytes})
			require.NoError(t, err)
			subject, data, headers, err := w.Prepare(0, tt.event)
			require.NoError(t, err)
			require.Equal(t, tt.wantSubject, subject)
			require.Equal(t, tt.wantData, string(data))
			require.JSONEq(t, tt.wantHeaders, string(headers))
		})
	}
}

// worstSize is the size Write counts for ev: its message with the
// publisher's headers at their longest.
func worstSize(t *testing.T, ev outbox.Event) int {
	t.Helper()
	data, err := json.Marshal(ev.Data)
	require.NoError(t, err)
	_, size, err := wire.Build(wire.Worst(wire.Event{Subject: ev.Subject, Type: ev.Type, EntityType: ev.EntityType,
		EntityID: ev.EntityID, Data: data, Headers: ev.Headers}), 1<<30, 0)
	require.NoError(t, err)
	return size
}

func TestWriteNilTransaction(t *testing.T) {
	t.Parallel()
	w, err := outbox.NewWriter(outbox.Config{})
	require.NoError(t, err)

	ids, err := w.Write(context.Background(), nil, validEvent())
	require.Error(t, err)
	require.NotErrorIs(t, err, outbox.ErrInvalidEvent)
	require.Nil(t, ids)
}

func TestValidationErrorMessageNamesEventAndField(t *testing.T) {
	t.Parallel()
	err := &outbox.ValidationError{Index: 3, Field: "Subject", Reason: "token 2 is empty"}
	require.Equal(t, "invalid event 3: Subject: token 2 is empty", err.Error())
	require.ErrorIs(t, err, outbox.ErrInvalidEvent)
	require.NotErrorIs(t, err, errors.New("invalid event"))
}

func TestValidateSubject(t *testing.T) {
	t.Parallel()
	tests := []struct {
		subject string
		valid   bool
	}{
		{"orders", true},
		{"order.OrderCreated", true},
		{"a.b.c.d", true},
		{"a-b_c.d:e", true},
		{"ordre.créé", true},
		{"", false},
		{"a b", false},
		{"*", false},
		{">", false},
		{"a.*", false},
		{"a.>", false},
		{"a.>.b", false},
		{"a..b", false},
		{".a", false},
		{"a.", false},
		{"a\n", false},
		{"a\tb", false},
		{"a\x00b", false},
		{"a\u2028b", false},
		{"\xff", false},
	}
	for _, tt := range tests {
		t.Run(tt.subject, func(t *testing.T) {
			t.Parallel()
			err := outbox.ValidateSubject(tt.subject)
			if tt.valid {
				require.NoError(t, err)
			} else {
				require.Error(t, err)
			}
		})
	}
}

func FuzzValidateSubject(f *testing.F) {
	for _, s := range []string{
		"", "a", "a.b", "order.OrderCreated", "a b", "a.*", "a.>", ">", "*",
		"a..b", ".a", "a.", ".", "a\n", "a\tb", "a\x01b", "a\x7f", "\xff", "a.\xc3",
		"ordre.créé", "a\u00a0b", "a\u0085b", "a\u2028b", "a*b", "a>b",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if outbox.ValidateSubject(s) != nil {
			return
		}
		if !utf8.ValidString(s) {
			t.Fatalf("accepted invalid UTF-8 %q", s)
		}
		for _, tok := range strings.Split(s, ".") {
			if tok == "" {
				t.Fatalf("accepted %q with an empty token", s)
			}
		}
		if strings.ContainsAny(s, "*>") {
			t.Fatalf("accepted %q with a wildcard", s)
		}
		if i := strings.IndexFunc(s, func(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) }); i >= 0 {
			t.Fatalf("accepted %q with whitespace or a control character at byte %d", s, i)
		}
		// Valid subjects stay valid when joined, and a trailing dot breaks them.
		if err := outbox.ValidateSubject(s + "." + s); err != nil {
			t.Fatalf("rejected %q joined with itself: %v", s, err)
		}
		if outbox.ValidateSubject(s+".") == nil {
			t.Fatalf("accepted %q with a trailing dot", s+".")
		}
	})
}

// FuzzWriterPrepare checks what validation lets through: an accepted event
// has a payload of valid UTF-8 JSON, kept byte for byte,
// a subject ValidateSubject accepts, and header names and values NATS can
// carry. Rejections must be *ValidationError; nothing may panic.
func FuzzWriterPrepare(f *testing.F) {
	f.Add("order", "o-1", "OrderCreated", "", []byte(`{"id":"o-1"}`), "traceparent", "00-1")
	f.Add("order", "o-1", "OrderCreated", "orders.created", []byte(`[1, 2.5e3, -0.1, "x"]`), "", "")
	f.Add("order", "o\x001", "Order*", "a..b", []byte(`{"a":"\u0000"}`), "Nats-Msg-Id", "x")
	f.Add("ordre", "é", "Créé", "", []byte(`"\ud83d\ude00"`), "a:b", "a\r\nb")
	f.Add("o", "1", "T", "", []byte(`"\\\u0000"`), "k", "\xff")
	f.Add("o", "1", "T", "", []byte(`"\ud800\\udc00"`), "k", "v")
	f.Add("o", "1", "T", "", []byte(`{"n":1e1000000}`), "k", "v")
	f.Add("o", "1", "T", "", []byte(`[1e-16383, 0e999999999, 9.9e131071]`), "k", "v")
	f.Add("o", "1", "T", "a\u00a0b", []byte("\"\xff\""), "é", "v")
	w, err := outbox.NewWriter(outbox.Config{})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, entityType, entityID, typ, subject string, data []byte, hk, hv string) {
		ev := outbox.Event{EntityType: entityType, EntityID: entityID, Type: typ, Subject: subject,
			Data: json.RawMessage(data)}
		if hk != "" || hv != "" {
			ev.Headers = map[string]string{hk: hv}
		}
		gotSubject, gotData, gotHeaders, err := w.Prepare(0, ev)
		if err != nil {
			var verr *outbox.ValidationError
			if !errors.As(err, &verr) || !errors.Is(err, outbox.ErrInvalidEvent) {
				t.Fatalf("rejection %v (%T) is not a *ValidationError", err, err)
			}
			return
		}
		if err := outbox.ValidateSubject(gotSubject); err != nil {
			t.Fatalf("accepted subject %q: %v", gotSubject, err)
		}
		if !utf8.Valid(gotData) || !json.Valid(gotData) {
			t.Fatalf("accepted payload %q that is not valid UTF-8 JSON", gotData)
		}
		var v any
		dec := json.NewDecoder(strings.NewReader(string(gotData)))
		dec.UseNumber()
		if err := dec.Decode(&v); err != nil {
			t.Fatalf("accepted payload %q: %v", gotData, err)
		}
		if string(gotData) != string(data) {
			t.Fatalf("payload %q stored as %q", data, gotData)
		}
		for _, f := range []string{entityType, entityID, typ} {
			if !natsHeaderValue(f) {
				t.Fatalf("accepted %q, which travels as a header value NATS cannot carry", f)
			}
		}
		var headers map[string]string
		if err := json.Unmarshal(gotHeaders, &headers); err != nil {
			t.Fatalf("headers %q: %v", gotHeaders, err)
		}
		for k, v := range headers {
			if !natsHeaderKey(k) || !natsHeaderValue(v) {
				t.Fatalf("accepted header %q: %q, which NATS cannot carry", k, v)
			}
			if strings.HasPrefix(strings.ToLower(k), "nats-") || strings.HasPrefix(strings.ToLower(k), "outbox-") {
				t.Fatalf("accepted reserved header %q", k)
			}
		}
	})
}

// natsHeaderKey and natsHeaderValue say what the NATS header wire format
// (MIME-style lines) carries: a name of printable ASCII without ':', and a
// value of UTF-8 without CR, LF or NUL.
func natsHeaderKey(k string) bool {
	if k == "" {
		return false
	}
	for i := 0; i < len(k); i++ {
		if k[i] <= ' ' || k[i] >= 0x7f || k[i] == ':' {
			return false
		}
	}
	return true
}

func natsHeaderValue(v string) bool {
	return utf8.ValidString(v) && !strings.ContainsAny(v, "\r\n\x00")
}
