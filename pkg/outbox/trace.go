package outbox

import (
	"context"
	"maps"
	"strings"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
)

// Trace context. Write captures the trace context of its ctx into each
// event's headers through an OpenTelemetry propagator: with the W3C
// TraceContext propagator that is "traceparent" and "tracestate". The
// publisher sends them as NATS headers and dedup.Processor.Handler restores
// them into the context its handler runs in, so the consumer's spans are
// children of the span that wrote the event. Only the OpenTelemetry API is
// used: without a propagator set by the application, nothing is added.

// propagator returns the configured propagator, or the global one.
func (w *Writer) propagator() propagation.TextMapPropagator {
	if w.prop != nil {
		return w.prop
	}
	return otel.GetTextMapPropagator()
}

// traceHeaders holds the trace context of one Write call.
type traceHeaders struct {
	headers map[string]string // what the propagator injected; nil: nothing
	owned   map[string]bool   // lower-cased names the propagator owns
}

// traceOf asks the propagator for the trace context of ctx.
func (w *Writer) traceOf(ctx context.Context) traceHeaders {
	prop := w.propagator()
	c := propagation.MapCarrier{}
	prop.Inject(ctx, c)
	if len(c) == 0 {
		return traceHeaders{}
	}
	owned := map[string]bool{}
	for _, f := range prop.Fields() {
		owned[strings.ToLower(f)] = true
	}
	for k := range c {
		owned[strings.ToLower(k)] = true
	}
	return traceHeaders{headers: c, owned: owned}
}

// apply returns h with the trace headers added, unless h already holds a
// header the propagator owns (compared without case): a caller that set
// its own trace context keeps it whole. h itself is never modified.
func (t traceHeaders) apply(h map[string]string) map[string]string {
	if t.headers == nil {
		return h
	}
	for k := range h {
		if t.owned[strings.ToLower(k)] {
			return h
		}
	}
	out := make(map[string]string, len(h)+len(t.headers))
	maps.Copy(out, h)
	maps.Copy(out, t.headers)
	return out
}
