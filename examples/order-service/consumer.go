package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgnats/outbox/pkg/dedup"
	"github.com/pgnats/outbox/pkg/outbox"
)

// dedupConsumer hands each JetStream message to a service's handler through
// dedup.Processor.Process, acking, nak'ing or terminating it as
// dedup.Processor.Handler does, and counts the outcomes: the demo reports
// the duplicates it skipped, which Processor.Handler does not expose.
type dedupConsumer struct {
	name  string // the consumer's name in processed_message
	proc  *dedup.Processor
	fn    func(ctx context.Context, tx *sqlx.Tx, msg jetstream.Msg) error
	log   *slog.Logger
	retry time.Duration
	cc    jetstream.ConsumeContext // set by consume

	processed, duplicates atomic.Int64
}

// Stop stops consuming and waits until the subscription is closed.
func (c *dedupConsumer) Stop() {
	c.cc.Stop()
	<-c.cc.Closed()
}

func (c *dedupConsumer) handle(msg jetstream.Msg) {
	id := msg.Headers().Get(outbox.HeaderEventID)
	if id == "" {
		c.log.Error("message without event id terminated", "consumer", c.name, "subject", msg.Subject())
		_ = msg.Term()
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	res, err := c.proc.Process(ctx, c.name, id, func(ctx context.Context, tx *sqlx.Tx) error {
		return c.fn(ctx, tx, msg)
	})
	switch {
	case err == nil:
		if res == dedup.Duplicate {
			c.duplicates.Add(1)
		} else {
			c.processed.Add(1)
		}
		if err := msg.Ack(); err != nil {
			c.log.Warn("message ack failed", "consumer", c.name, "message_id", id, "error", err)
		}
	case errors.Is(err, dedup.ErrPermanent):
		c.log.Error("message terminated after permanent error", "consumer", c.name, "message_id", id, "error", err)
		_ = msg.Term()
	default:
		c.log.Warn("message processing failed, redelivery requested", "consumer", c.name, "message_id", id, "error", err)
		_ = msg.NakWithDelay(c.retry)
	}
}

// consume creates a durable pull consumer of filter on the stream and hands
// its messages to c until c.Stop.
func consume(ctx context.Context, js jetstream.JetStream, stream, filter string, c *dedupConsumer) (jetstream.Consumer, error) {
	cons, err := js.CreateOrUpdateConsumer(ctx, stream, jetstream.ConsumerConfig{
		Durable:       c.name,
		FilterSubject: filter,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       10 * time.Second, // over the handler's 5s timeout
		MaxDeliver:    20,
	})
	if err != nil {
		return nil, fmt.Errorf("create consumer %s: %w", c.name, err)
	}
	c.cc, err = cons.Consume(c.handle, jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
		c.log.Warn("consume", "consumer", c.name, "error", err)
	}))
	if err != nil {
		return nil, fmt.Errorf("consume %s: %w", c.name, err)
	}
	return cons, nil
}
