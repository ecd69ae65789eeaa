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

// Defaults of HandlerConfig.
const (
	DefaultNakDelay           = time.Second
	DefaultMaxNakDelay        = time.Minute
	DefaultInProgressInterval = 10 * time.Second
	DefaultTimeout            = 5 * time.Minute
)

// HandlerConfig configures Processor.Handler. The zero value of each
// optional field means its default.
type HandlerConfig struct {
	// Consumer names the consuming service in the processed-message table,
	// e.g. "billing". Required. Every instance of one logical consumer must
	// use the same name; different consumers of the same message must not.
	Consumer string
	// NakDelay is how long JetStream waits before redelivering a message
	// whose handler failed for the first time. Each further failed
	// delivery doubles it (the delivery count comes from the message's
	// metadata), up to MaxNakDelay, so an outage of the database or of a
	// service the handler calls does not use up the consumer's MaxDeliver
	// in seconds. Default: 1s (DefaultNakDelay).
	NakDelay time.Duration
	// MaxNakDelay caps the redelivery delay. Default: 1m
	// (DefaultMaxNakDelay); raised to NakDelay if lower.
	MaxNakDelay time.Duration
	// InProgressInterval is how often, while the handler runs, the message
	// is reported in progress to JetStream (msg.InProgress), which
	// restarts the consumer's AckWait: a handler that runs longer than
	// AckWait keeps its message and it is not redelivered meanwhile.
	// Keep it well below the consumer's AckWait (a third leaves room for
	// a late report). Default: 10s (DefaultInProgressInterval), for
	// JetStream's default AckWait of 30s. Negative: never report.
	InProgressInterval time.Duration
	// Timeout bounds the processing of one message: it is the deadline of
	// the context passed to the handler; when it passes, the message is
	// rolled back and nak'd like any failure. It may exceed the consumer's
	// AckWait, since the message is kept alive by InProgressInterval, but
	// only until Timeout: a handler that ignores its context and hangs no
	// longer keeps its message, which JetStream redelivers once AckWait
	// runs out.
	// Default: 5m (DefaultTimeout).
	Timeout time.Duration
	// Logger receives a record for each message terminated or sent back
	// for redelivery, and the records Process would send to the
	// Processor's logger (a panic with its stack, a failed rollback).
	// Default: the Processor's logger.
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
//   - fn (or the database) fails, or fn panics: the transaction is rolled
//     back and the message is nak'd with a delay that grows with its
//     delivery count (cfg.NakDelay doubled each time, up to
//     cfg.MaxNakDelay), so JetStream redelivers it, up to the consumer's
//     MaxDeliver; a panic is logged with its stack and does not reach the
//     caller's goroutine;
//   - fn fails with an error wrapped by Permanent: the message is
//     terminated and never redelivered;
//   - the event id header is missing or empty: the message is terminated
//     without running fn, since it could never be deduplicated.
//
// The context fn receives carries the trace context the outbox writer
// stored in the message's headers (see HandlerConfig.Propagator) and the
// deadline cfg.Timeout. While fn runs, the message is reported in progress
// every cfg.InProgressInterval, so a handler slower than the consumer's
// AckWait is not redelivered to another instance meanwhile.
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
		p:          p,
		fn:         fn,
		consumer:   cfg.Consumer,
		nakDelay:   positiveOr(cfg.NakDelay, DefaultNakDelay),
		maxDelay:   positiveOr(cfg.MaxNakDelay, DefaultMaxNakDelay),
		inProgress: cfg.InProgressInterval,
		timeout:    positiveOr(cfg.Timeout, DefaultTimeout),
		log:        cmp.Or(cfg.Logger, p.log),
		prop:       cfg.Propagator,
	}
	h.maxDelay = max(h.maxDelay, h.nakDelay)
	if h.inProgress == 0 {
		h.inProgress = DefaultInProgressInterval
	}
	return h.handle
}

type msgHandler struct {
	p          *Processor
	fn         func(ctx context.Context, tx *sqlx.Tx, msg jetstream.Msg) error
	consumer   string
	nakDelay   time.Duration
	maxDelay   time.Duration
	inProgress time.Duration // <= 0: never
	timeout    time.Duration
	log        *slog.Logger
	prop       propagation.TextMapPropagator // nil: the global one
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
	stop := h.keepAlive(ctx, msg, id)
	_, err := h.p.processLogged(ctx, h.log, h.consumer, id, func(ctx context.Context, tx *sqlx.Tx) error {
		return h.fn(ctx, tx, msg)
	})
	// No in-progress report may follow the ack, nak or term.
	stop()
	switch {
	case err == nil:
		if err := msg.Ack(); err != nil {
			h.log.Warn("message ack failed", h.attrs(msg, id, "error", err)...)
		}
	case errors.Is(err, ErrPermanent):
		h.log.Error("message terminated after permanent error", h.attrs(msg, id, "error", err)...)
		h.term(msg, id)
	default:
		delay := h.delay(msg)
		h.log.Warn("message processing failed, redelivery requested", h.attrs(msg, id, "error", err, "delay", delay)...)
		if err := msg.NakWithDelay(delay); err != nil {
			h.log.Warn("message nak failed", h.attrs(msg, id, "error", err)...)
		}
	}
}

// delay returns the redelivery delay of msg after a failure: nakDelay for
// its first delivery, doubled for each later one, capped at maxDelay.
func (h *msgHandler) delay(msg jetstream.Msg) time.Duration {
	md, err := msg.Metadata()
	if err != nil || md.NumDelivered <= 1 {
		return h.nakDelay
	}
	d := h.nakDelay
	for n := md.NumDelivered; n > 1; n-- {
		if d > h.maxDelay/2 { // doubling would pass the cap (or overflow)
			return h.maxDelay
		}
		d *= 2
	}
	return d
}

// keepAlive reports msg in progress every h.inProgress until the returned
// function is called or ctx (the processing's Timeout) ends; that function
// returns once no report is being sent.
func (h *msgHandler) keepAlive(ctx context.Context, msg jetstream.Msg, id string) (stop func()) {
	if h.inProgress <= 0 {
		return func() {}
	}
	done, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		t := time.NewTicker(h.inProgress)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-ctx.Done():
				// Past Timeout the processing has failed, even if fn has
				// not returned yet (a call that ignores ctx): let AckWait
				// run out so JetStream redelivers the message, rather
				// than keep it here for as long as fn hangs.
				return
			case <-t.C:
				if err := msg.InProgress(); err != nil {
					h.log.Warn("message in-progress report failed", h.attrs(msg, id, "error", err)...)
				}
			}
		}
	}()
	return func() {
		close(done)
		<-stopped
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
