package dedup_test

import (
	"context"
	"sync"
	"testing"

	"github.com/jmoiron/sqlx"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/dedup"
	"github.com/pgnats/outbox/pkg/outbox"
)

func TestHandlerRestoresTraceContext(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, header string
	}{
		{"as the writer stores it", "traceparent"},
		{"in another case", "Traceparent"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := setupJS(t)
			h := nats.Header{}
			h.Set(outbox.HeaderMsgID, testenv.Suffix())
			h.Set(outbox.HeaderEventID, "e1")
			h.Set(tc.header, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
			h.Set("tracestate", "vendor=value")
			_, err := b.js.PublishMsg(t.Context(), &nats.Msg{Subject: b.prefix + ".orders", Header: h, Data: []byte(`{}`)})
			require.NoError(t, err)

			var (
				mu  sync.Mutex
				got trace.SpanContext
			)
			b.consume(t, dedup.HandlerConfig{Propagator: propagation.TraceContext{}},
				func(ctx context.Context, tx *sqlx.Tx, msg jetstream.Msg) error {
					mu.Lock()
					got = trace.SpanContextFromContext(ctx)
					mu.Unlock()
					return writeEventEffect(ctx, tx, msg)
				})
			b.waitSettled(t, func() bool { return b.effects(t, consumerName, "e1") == 1 }, "message processed")

			mu.Lock()
			defer mu.Unlock()
			require.True(t, got.IsValid(), "handler context carries a span context")
			require.True(t, got.IsRemote())
			require.Equal(t, "4bf92f3577b34da6a3ce929d0e0e4736", got.TraceID().String())
			require.Equal(t, "00f067aa0ba902b7", got.SpanID().String())
			require.True(t, got.IsSampled())
			require.Equal(t, "vendor=value", got.TraceState().String())
		})
	}
}
