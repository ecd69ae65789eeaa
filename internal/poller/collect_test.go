package poller

import (
	"context"
	"database/sql"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
)

// When the ack deadline and every ack are ready together (the next batch's
// claim took longer than AckTimeout, say), the batch is acked, not an
// outage: collect must not let select pick between them at random.
func TestCollectTakesReadyAcksPastTheDeadline(t *testing.T) {
	t.Parallel()
	nc, js := testenv.NATS(t)
	_, prefix := testenv.Stream(t, js)
	db, err := sql.Open("postgres", testenv.DatabaseURL())
	require.NoError(t, err)
	t.Cleanup(func() { db.Close() })
	p, err := New(Config{DB: db, DSN: testenv.DatabaseURL(), NATS: nc, AckTimeout: time.Second})
	require.NoError(t, err)

	b := &batch{refusedEntities: map[string]bool{}}
	for i := range 30 {
		r := &row{id: fmt.Sprint(i), seq: int64(i + 1), subject: prefix + ".order.changed", entityType: "order", entityID: fmt.Sprint(i % 3)}
		msg := nats.NewMsg(r.subject)
		msg.Data = []byte(`{}`)
		paf, err := p.js.PublishMsgAsync(msg)
		require.NoError(t, err)
		b.sent = append(b.sent, inflight{r: r, paf: paf, at: time.Now()})
	}
	select {
	case <-p.js.PublishAsyncComplete():
	case <-time.After(10 * time.Second):
		t.Fatal("no acks within 10s")
	}
	b.sentAt = time.Now().Add(-time.Minute) // the deadline passed long ago

	acked := p.collect(context.Background(), b)
	require.NoError(t, b.outage)
	require.Len(t, acked, len(b.sent))
}

// Past the deadline, a message without an ack (its stream never answers)
// does not hide the acks that arrived for the messages sent after it: they
// are taken, and only the unanswered one makes the outage.
func TestCollectTakesLaterAcksPastAnUnansweredMessage(t *testing.T) {
	t.Parallel()
	nc, js := testenv.NATS(t)
	_, prefix := testenv.Stream(t, js)
	stuck := "s" + testenv.Suffix()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "STUCK_" + stuck, Subjects: []string{stuck + ".>"},
		Storage: jetstream.MemoryStorage, NoAck: true})
	require.NoError(t, err)
	t.Cleanup(func() { _ = js.DeleteStream(context.Background(), "STUCK_"+stuck) })
	db, err := sql.Open("postgres", testenv.DatabaseURL())
	require.NoError(t, err)
	t.Cleanup(func() { db.Close() })
	// The client's own ack timeout must not answer for the stuck message.
	p, err := New(Config{DB: db, DSN: testenv.DatabaseURL(), NATS: nc, AckTimeout: time.Minute})
	require.NoError(t, err)

	b := &batch{refusedEntities: map[string]bool{}}
	for i := range 11 {
		subject := prefix + ".order.changed"
		if i == 0 {
			subject = stuck + ".order.changed"
		}
		r := &row{id: fmt.Sprint(i), seq: int64(i + 1), subject: subject, entityType: "order", entityID: fmt.Sprint(i)}
		msg := nats.NewMsg(r.subject)
		msg.Data = []byte(`{}`)
		paf, err := p.js.PublishMsgAsync(msg)
		require.NoError(t, err)
		b.sent = append(b.sent, inflight{r: r, paf: paf, at: time.Now()})
	}
	testenv.Eventually(t, 10*time.Second, func() bool { return p.js.PublishAsyncPending() == 1 },
		"every message but the stuck one acked")
	b.sentAt = time.Now().Add(-time.Minute) // the deadline passed long ago

	acked := p.collect(context.Background(), b)
	require.Error(t, b.outage, "the unanswered message is an outage")
	require.Len(t, acked, len(b.sent)-1, "the acks behind it are taken")
}
