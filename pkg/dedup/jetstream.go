package dedup

import (
	"cmp"
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/propagation"

	"github.com/pgnats/outbox/pkg/outbox"
)

const (
	defaultNakDelay = time.Second
	defaultTimeout  = 30 * time.Second
)

// HandlerConfig configures Processor.Handler. The zero value of each
// optional field means its default.
type HandlerConfig struct {
	// Consumer names the consuming service in the processed-message table,
	// e.g. "billing". Required. Every instance of one logical consumer must
	// use the same name; different consumers of the same message must not.
	Consumer string
	// NakDelay is how long JetStream waits before redelivering a message
	// whose handler failed. Default: 1s.
	NakDelay time.Duration
	// Timeout bounds the processing of one message: it is the deadline of
	// the context passed to the handler. Default: 30s.
	// Keep it below the JetStream consumer's AckWait, or a slow message is
	// redelivered while still being processed (the redelivery then waits
	// for this attempt and is dropped as a duplicate if it commits).
	Timeout time.Duration
	// Logger receives a record for each message terminated or sent back
	// for redelivery. Default: the Processor's logger.
	Logger *slog.Logger
	// Propagator extracts the trace context that the outbox writer stored
	// in the message's headers ("traceparent", "tracestate") into the
	// context fn runs in, so fn's spans continue the writer's trace.
	// Default: otel.GetTextMapPropagator(), read for each message.
	Propagator propagation.TextMapPropagator
}

// Handler returns a JetStream message handler, for Consumer.Consume or
// Consumer.Messages, that runs fn through Process with cfg.Consumer and the
// message's outbox event id (header outbox.HeaderEventID) as the key:
//
//   - processed or duplicate: the message is acked, after the commit;
//   - fn (or the database) fails: the message is nak'd with cfg.NakDelay,
//     so JetStream redelivers it, up to the consumer's MaxDeliver;
//   - fn fails with an error wrapped by Permanent: the message is
//     terminated and never redelivered;
//   - the event id header is missing or empty: the message is terminated
//     without running fn, since it could never be deduplicated.
//
// The context fn receives carries the trace context the outbox writer
// stored in the message's headers (see HandlerConfig.Propagator) and the
// deadline cfg.Timeout.
//
// An ack that is lost makes JetStream redeliver the message, which is then
// acked as a duplicate. Every failure is logged to cfg.Logger. The handler
// is safe for concurrent use. Handler panics if cfg.Consumer is empty or fn
// is nil: a programming error, reported when the handler is built rather
// than on every message.
func (p *Processor) Handler(cfg HandlerConfig, fn func(ctx context.Context, tx *sqlx.Tx, msg jetstream.Msg) error) jetstream.MessageHandler {
	if cfg.Consumer == "" {
		panic("dedup: HandlerConfig.Consumer is required")
	}
	if fn == nil {
		panic("dedup: nil handler function")
	}
	h := &msgHandler{
		p:        p,
		fn:       fn,
		consumer: cfg.Consumer,
		nakDelay: positiveOr(cfg.NakDelay, defaultNakDelay),
		timeout:  positiveOr(cfg.Timeout, defaultTimeout),
		log:      cmp.Or(cfg.Logger, p.log),
		prop:     cfg.Propagator,
	}
	return h.handle
}

type msgHandler struct {
	p        *Processor
	fn       func(ctx context.Context, tx *sqlx.Tx, msg jetstream.Msg) error
	consumer string
	nakDelay time.Duration
	timeout  time.Duration
	log      *slog.Logger
	prop     propagation.TextMapPropagator // nil: the global one
}

func (h *msgHandler) handle(msg jetstream.Msg) {
	id := msg.Headers().Get(outbox.HeaderEventID)
	if id == "" {
		h.log.Warn("message without event id terminated", h.attrs(msg, "", "header", outbox.HeaderEventID)...)
		h.term(msg, id)
		return
	}

	ctx, cancel := context.WithTimeout(traceContext(context.Background(), h.prop, msg.Headers()), h.timeout)
	defer cancel()
	_, err := h.p.Process(ctx, h.consumer, id, func(ctx context.Context, tx *sqlx.Tx) error {
		return h.fn(ctx, tx, msg)
	})
	switch {
	case err == nil:
		if err := msg.Ack(); err != nil {
			h.log.Warn("message ack failed", h.attrs(msg, id, "error", err)...)
		}
	case errors.Is(err, ErrPermanent):
		h.log.Error("message terminated after permanent error", h.attrs(msg, id, "error", err)...)
		h.term(msg, id)
	default:
		h.log.Warn("message processing failed, redelivery requested", h.attrs(msg, id, "error", err, "delay", h.nakDelay)...)
		if err := msg.NakWithDelay(h.nakDelay); err != nil {
			h.log.Warn("message nak failed", h.attrs(msg, id, "error", err)...)
		}
	}
}

// term uses Term rather than TermWithReason: servers before 2.10.4 ignore a
// reason-carrying term and would redeliver the message; the reason is in
// the log record instead.
func (h *msgHandler) term(msg jetstream.Msg, id string) {
	if err := msg.Term(); err != nil {
		h.log.Warn("message term failed", h.attrs(msg, id, "error", err)...)
	}
}

// attrs returns the key/value pairs identifying msg in a log record,
// followed by extra.
func (h *msgHandler) attrs(msg jetstream.Msg, id string, extra ...any) []any {
	kv := []any{"consumer", h.consumer, "subject", msg.Subject()}
	if id != "" {
		kv = append(kv, "message_id", id)
	}
	if md, err := msg.Metadata(); err == nil {
		kv = append(kv, "stream", md.Stream, "stream_seq", md.Sequence.Stream, "deliveries", md.NumDelivered)
	}
	return append(kv, extra...)
}

func positiveOr(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}
