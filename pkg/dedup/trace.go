package dedup

import (
	"context"
	"strings"

	"github.com/nats-io/nats.go"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
)

// headerCarrier reads and writes a NATS message's headers for an
// OpenTelemetry propagator. NATS header names are case-sensitive; Get
// falls back to a case-insensitive match, so "Traceparent" set by another
// producer is found too.
type headerCarrier nats.Header

func (c headerCarrier) Get(key string) string {
	if v := nats.Header(c).Get(key); v != "" {
		return v
	}
	for k, vs := range c {
		if len(vs) > 0 && strings.EqualFold(k, key) {
			return vs[0]
		}
	}
	return ""
}

func (c headerCarrier) Set(key, value string) { nats.Header(c).Set(key, value) }

func (c headerCarrier) Keys() []string {
	keys := make([]string, 0, len(c))
	for k := range c {
		keys = append(keys, k)
	}
	return keys
}

// traceContext returns ctx carrying the trace context found in h by prop
// (nil: the global propagator), or ctx unchanged when h holds none.
func traceContext(ctx context.Context, prop propagation.TextMapPropagator, h nats.Header) context.Context {
	if prop == nil {
		prop = otel.GetTextMapPropagator()
	}
	return prop.Extract(ctx, headerCarrier(h))
}
