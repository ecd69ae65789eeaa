package bench

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgnats/outbox/pkg/outbox"
)

// natsLimit measures asynchronous JetStream publishing with Nats-Msg-Id and
// the publisher's headers alone, no database: the broker's ceiling.
func (e *env) natsLimit(ctx context.Context) (float64, error) {
	if err := e.reset(ctx); err != nil {
		return 0, err
	}
	js, err := jetstream.New(e.nc, jetstream.WithPublishAsyncMaxPending(e.cfg.BatchSize*2))
	if err != nil {
		return 0, err
	}
	payload := makePayload(e.cfg.Payload)
	n := e.cfg.Events
	e.prog.start("publish (NATS only)", n)
	start := time.Now()
	for i := range n {
		id := uuid.Must(uuid.NewV7()).String()
		m := nats.NewMsg(e.prefix + ".nats")
		m.Data = payload
		m.Header.Set(jetstream.MsgIDHeader, id)
		m.Header.Set(outbox.HeaderEventID, id)
		m.Header.Set(outbox.HeaderEventType, "Tick")
		m.Header.Set(outbox.HeaderEntityType, "bench")
		m.Header.Set(outbox.HeaderEntityID, strconv.Itoa(i%e.cfg.Entities))
		m.Header.Set(outbox.HeaderSeq, strconv.Itoa(i))
		m.Header.Set(outbox.HeaderCreatedAt, start.UTC().Format(time.RFC3339Nano))
		if _, err := js.PublishMsgAsync(m); err != nil {
			return 0, err
		}
		if i%1000 == 0 {
			e.prog.set(i)
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-time.After(time.Minute):
		return 0, fmt.Errorf("acks: %w", errTimeout)
	}
	elapsed := time.Since(start)
	e.prog.set(n)
	e.prog.done()
	return float64(n) / elapsed.Seconds(), nil
}
