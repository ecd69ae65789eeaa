package outbox_test

import (
	"context"
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// spanContext returns ctx carrying a sampled span context with fixed ids,
// as a tracer would after starting a span, and its W3C traceparent.
func spanContext(t *testing.T, ctx context.Context) (context.Context, string) {
	t.Helper()
	tid, err := trace.TraceIDFromHex("4bf92f3577b34da6a3ce929d0e0e4736")
	require.NoError(t, err)
	sid, err := trace.SpanIDFromHex("00f067aa0ba902b7")
	require.NoError(t, err)
	state, err := trace.ParseTraceState("vendor=value")
	require.NoError(t, err)
	sc := trace.NewSpanContext(trace.SpanContextConfig{TraceID: tid, SpanID: sid,
		TraceFlags: trace.FlagsSampled, TraceState: state})
	return trace.ContextWithSpanContext(ctx, sc), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
}

// writeHeaders writes events with w in ctx and returns each stored row's
// headers.
func writeHeaders(t *testing.T, ctx context.Context, w *outbox.Writer, events ...outbox.Event) []map[string]string {
	t.Helper()
	db := testenv.NewDB(t)
	tx, err := db.BeginTx(ctx, nil)
	require.NoError(t, err)
	_, err = w.Write(ctx, tx, events...)
	require.NoError(t, err)
	require.NoError(t, tx.Commit())
	var out []map[string]string
	for _, r := range storedEvents(t, db, "events") {
		var h map[string]string
		require.NoError(t, json.Unmarshal([]byte(r.Headers), &h))
		out = append(out, h)
	}
	return out
}

func traceEvent(headers map[string]string) outbox.Event {
	return outbox.Event{EntityType: "order", EntityID: "1", Type: "OrderCreated", Data: 1, Headers: headers}
}

func TestWriteCapturesTraceContext(t *testing.T) {
	t.Parallel()
	w := newWriter(t, outbox.Config{Propagator: propagation.TraceContext{}})

	t.Run("span in ctx becomes traceparent and tracestate", func(t *testing.T) {
		t.Parallel()
		ctx, traceparent := spanContext(t, context.Background())
		mine := map[string]string{"X-Tenant": "acme"}
		got := writeHeaders(t, ctx, w, traceEvent(mine), traceEvent(nil))
		want := map[string]string{"traceparent": traceparent, "tracestate": "vendor=value"}
		require.Equal(t, map[string]string{"X-Tenant": "acme", "traceparent": traceparent, "tracestate": "vendor=value"}, got[0])
		require.Equal(t, want, got[1], "every event of the Write gets the trace context")
		require.Equal(t, map[string]string{"X-Tenant": "acme"}, mine, "the caller's map is not modified")
	})

	t.Run("trace context set by the caller is kept", func(t *testing.T) {
		t.Parallel()
		ctx, _ := spanContext(t, context.Background())
		own := map[string]string{"Traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
		got := writeHeaders(t, ctx, w, traceEvent(own))
		require.Equal(t, own, got[0])
	})

	t.Run("no span, no trace headers", func(t *testing.T) {
		t.Parallel()
		got := writeHeaders(t, context.Background(), w, traceEvent(nil))
		require.Empty(t, got[0])
	})

	t.Run("trace headers count toward MaxBytes", func(t *testing.T) {
		t.Parallel()
		ev := outbox.Event{EntityType: "o", EntityID: "1", Type: "T", Data: "0123456789012345678901234567890123456789"}
		// A traceparent header line is 70 bytes.
		small := newWriter(t, outbox.Config{Propagator: propagation.TraceContext{}, MaxBytes: worstSize(t, ev) + 30})
		db := testenv.NewDB(t)
		tx, err := db.BeginTx(context.Background(), nil)
		require.NoError(t, err)
		defer tx.Rollback() //nolint:errcheck
		_, err = small.Write(context.Background(), tx, ev)
		require.NoError(t, err, "fits without a trace")
		ctx, _ := spanContext(t, context.Background())
		_, err = small.Write(ctx, tx, ev)
		require.ErrorIs(t, err, outbox.ErrInvalidEvent)
	})
}

// TestWriteUsesGlobalPropagator sets the process-wide propagator, so it
// does not run in parallel (parallel tests start after it has restored it).
func TestWriteUsesGlobalPropagator(t *testing.T) {
	w := newWriter(t, outbox.Config{})
	ctx, traceparent := spanContext(t, context.Background())

	got := writeHeaders(t, ctx, w, traceEvent(nil))
	require.Empty(t, got[0], "OpenTelemetry's default global propagator injects nothing")

	prev := otel.GetTextMapPropagator()
	otel.SetTextMapPropagator(propagation.TraceContext{})
	t.Cleanup(func() { otel.SetTextMapPropagator(prev) })
	got = writeHeaders(t, ctx, w, traceEvent(nil))
	require.Equal(t, traceparent, got[0]["traceparent"], "a propagator set after NewWriter is used")
}
