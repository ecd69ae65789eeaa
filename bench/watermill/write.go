package main

import (
	"context"
	"fmt"
	"strconv"

	"github.com/ThreeDotsLabs/watermill"
	wmsql "github.com/ThreeDotsLabs/watermill-sql/v4/pkg/sql"
	"github.com/ThreeDotsLabs/watermill/components/forwarder"
	"github.com/ThreeDotsLabs/watermill/message"
)

// writeBacklog writes cfg.Events events the way a service using Watermill's
// outbox does: in its own transaction, through a watermill-sql publisher
// bound to that transaction, wrapped by the forwarder's publisher so that
// each row is an envelope naming its destination subject. Each write
// transaction carries cfg.WriteTx events in one Publish call.
func (b *bench) writeBacklog(ctx context.Context) error {
	payload := makePayload(b.cfg.Payload)
	for done := 0; done < b.cfg.Events; {
		n := min(b.cfg.WriteTx, b.cfg.Events-done)
		msgs := make([]*message.Message, n)
		for i := range msgs {
			m := message.NewMessage(watermill.NewUUID(), payload)
			m.Metadata.Set("entity_type", "Bench")
			m.Metadata.Set("entity_id", "entity-"+strconv.Itoa((done+i)%b.cfg.Entities))
			m.Metadata.Set("event_type", "Tick")
			msgs[i] = m
		}
		if err := b.writeTx(ctx, msgs); err != nil {
			return fmt.Errorf("write backlog: %w", err)
		}
		done += n
	}
	return nil
}

func (b *bench) writeTx(ctx context.Context, msgs []*message.Message) error {
	tx, err := b.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback() }()
	pub, err := wmsql.NewPublisher(wmsql.TxFromStdSQL(tx), wmsql.PublisherConfig{SchemaAdapter: b.schema}, watermill.NopLogger{})
	if err != nil {
		return err
	}
	envelopes := forwarder.NewPublisher(pub, forwarder.PublisherConfig{ForwarderTopic: b.topic})
	if err := envelopes.Publish(b.subject, msgs...); err != nil {
		return err
	}
	return tx.Commit()
}

// makePayload is a JSON string of n bytes, the payload `publisher bench`
// writes.
func makePayload(n int) []byte {
	p := make([]byte, n)
	p[0], p[n-1] = '"', '"'
	for i := 1; i < n-1; i++ {
		p[i] = 'a' + byte(i%26)
	}
	return p
}
