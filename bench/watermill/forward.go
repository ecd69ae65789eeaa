package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wmnats "github.com/ThreeDotsLabs/watermill-nats/v2/pkg/nats"
	"github.com/ThreeDotsLabs/watermill/components/forwarder"
	"github.com/ThreeDotsLabs/watermill/message"
)

// forward runs Watermill's forwarder over the backlog and returns how long
// it took to publish every event to JetStream (each Publish returns only
// after its PubAck) and commit the consumer group's offset past the last
// one, counted from the moment the forwarder is started: the counterpart of
// the project's "acked by JetStream and marked SUCCESS".
func (b *bench) forward(ctx context.Context) (time.Duration, error) {
	var last int64
	if err := b.db.QueryRowContext(ctx, `SELECT max("offset") FROM `+b.schema.MessagesTable(b.topic)).Scan(&last); err != nil {
		return 0, fmt.Errorf("last offset: %w", err)
	}
	pub, err := wmnats.NewPublisher(wmnats.PublisherConfig{
		URL: b.cfg.NATSURL,
		JetStream: wmnats.JetStreamConfig{
			TrackMsgId: b.cfg.TrackMsgID,
		},
	}, watermill.NopLogger{})
	if err != nil {
		return 0, fmt.Errorf("nats publisher: %w", err)
	}
	defer pub.Close()
	counted := &countingPublisher{Publisher: pub, target: int64(b.cfg.Events), done: make(chan struct{})}

	fwd, err := forwarder.NewForwarder(b.sub, counted, watermill.NopLogger{}, forwarder.Config{
		ForwarderTopic: b.topic,
		CloseTimeout:   10 * time.Second,
	})
	if err != nil {
		return 0, fmt.Errorf("forwarder: %w", err)
	}

	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	runErr := make(chan error, 1)
	start := time.Now()
	wg.Go(func() { runErr <- fwd.Run(rctx) })
	defer func() {
		_ = fwd.Close()
		wg.Wait()
	}()

	progress := time.NewTicker(5 * time.Second)
	defer progress.Stop()
	timeout := time.After(b.cfg.Timeout)
	for {
		select {
		case <-counted.done:
			if err := b.waitCommitted(ctx, last); err != nil {
				return 0, err
			}
			return time.Since(start), nil
		case err := <-runErr:
			return 0, fmt.Errorf("forwarder stopped after %d of %d events: %v", counted.n.Load(), b.cfg.Events, err)
		case <-progress.C:
			fmt.Fprintf(os.Stderr, "forwarded %d of %d events\n", counted.n.Load(), b.cfg.Events)
		case <-timeout:
			return 0, fmt.Errorf("forwarded %d of %d events in %s (a transaction older than the backlog "+
				"holds pg_snapshot_xmin back, and watermill-sql reads only below it)", counted.n.Load(), b.cfg.Events, b.cfg.Timeout)
		case <-ctx.Done():
			return 0, errors.Join(ctx.Err(), fmt.Errorf("forwarded %d of %d events", counted.n.Load(), b.cfg.Events))
		}
	}
}

// countingPublisher counts the messages its Publisher has published and
// closes done when target is reached.
type countingPublisher struct {
	message.Publisher
	n      atomic.Int64
	target int64
	done   chan struct{}
}

func (c *countingPublisher) Publish(topic string, msgs ...*message.Message) error {
	if err := c.Publisher.Publish(topic, msgs...); err != nil {
		return err
	}
	if n := c.n.Add(int64(len(msgs))); n >= c.target && n-int64(len(msgs)) < c.target {
		close(c.done)
	}
	return nil
}

// waitCommitted waits until the consumer group's acked offset reaches last.
func (b *bench) waitCommitted(ctx context.Context, last int64) error {
	q := `SELECT coalesce(max(offset_acked), 0) FROM ` + b.offsets.MessagesOffsetsTable(b.topic)
	deadline := time.Now().Add(30 * time.Second)
	for {
		var acked int64
		if err := b.db.QueryRowContext(ctx, q).Scan(&acked); err != nil {
			return fmt.Errorf("read the acked offset: %w", err)
		}
		if acked >= last {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("offset %d acked, %d expected", acked, last)
		}
		time.Sleep(time.Millisecond)
	}
}
