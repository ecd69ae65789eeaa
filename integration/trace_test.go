package integration

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/dedup"
	"github.com/pgnats/outbox/pkg/outbox"
)

// TestTraceContextReachesConsumer starts a span, writes an event in it,
// lets the publisher binary send it, and consumes it with pkg/dedup: the
// span the handler starts is a child of the span that wrote the event.
func TestTraceContextReachesConsumer(t *testing.T) {
	t.Parallel()
	b := setup(t)
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	tracer := tp.Tracer("outbox-integration-test")
	// The propagator each side is given, as an application would set the
	// global one with otel.SetTextMapPropagator.
	prop := propagation.TraceContext{}

	w, err := outbox.NewWriter(outbox.Config{Propagator: prop})
	require.NoError(t, err)
	ctx, write := tracer.Start(context.Background(), "place order")
	tx, err := b.db.Beginx()
	require.NoError(t, err)
	_, err = w.Write(ctx, tx, outbox.Event{EntityType: "order", EntityID: "1", Type: "OrderPlaced",
		Subject: b.prefix + ".order.placed", Data: payload{Entity: "1", N: 1}})
	require.NoError(t, err)
	require.NoError(t, tx.Commit())
	write.End()

	startPublisher(t, "publisher", b.db.DSN)

	p, err := dedup.New(b.db.DB, dedup.Config{})
	require.NoError(t, err)
	stream, err := b.js.Stream(t.Context(), b.stream)
	require.NoError(t, err)
	cons, err := stream.CreateOrUpdateConsumer(t.Context(), jetstream.ConsumerConfig{Durable: "billing"})
	require.NoError(t, err)
	var handled atomic.Int32
	cc, err := cons.Consume(p.Handler(dedup.HandlerConfig{Consumer: "billing", Propagator: prop},
		func(ctx context.Context, tx *sqlx.Tx, msg jetstream.Msg) error {
			_, span := tracer.Start(ctx, "reserve credit")
			defer span.End()
			handled.Add(1)
			return nil
		}))
	require.NoError(t, err)
	t.Cleanup(cc.Stop)
	testenv.Eventually(t, 30*time.Second, func() bool { return handled.Load() == 1 }, "event consumed")
	cc.Stop()

	var consumed sdktrace.ReadOnlySpan
	testenv.Eventually(t, 10*time.Second, func() bool {
		for _, s := range rec.Ended() {
			if s.Name() == "reserve credit" {
				consumed = s
				return true
			}
		}
		return false
	}, "consumer span ended")
	require.Equal(t, write.SpanContext().TraceID(), consumed.SpanContext().TraceID(), "same trace")
	require.Equal(t, write.SpanContext().SpanID(), consumed.Parent().SpanID(), "the writing span is the parent")
	require.True(t, consumed.Parent().IsRemote(), "the parent came through the message headers")
}
