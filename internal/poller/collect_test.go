package poller

import (
	"context"
	"database/sql"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
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
