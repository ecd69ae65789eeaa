package poller_test

import (
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// Events on per-entity subjects (order.<id>.created), each subject new to
// the publisher, cost a bounded number of JetStream API requests, not one
// or two per subject: the publisher reads the streams' subject filters and
// matches subjects itself. The requests are counted by a subscriber on
// the in-process server's API subjects.
func TestPerEntitySubjectsCostBoundedJetStreamRequests(t *testing.T) {
	t.Parallel()
	b, srv := setupServer(t)

	spy, _ := srv.Connect(t)
	var requests atomic.Int64
	sub, err := spy.Subscribe("$JS.API.>", func(*nats.Msg) { requests.Add(1) })
	require.NoError(t, err)
	require.NoError(t, spy.Flush())

	const entities = 300
	events := make([]outbox.Event, entities)
	for i := range events {
		id := fmt.Sprint(i)
		events[i] = outbox.Event{EntityType: "order", EntityID: id, Type: "Created",
			Subject: b.prefix + ".order." + id + ".created", Data: map[string]int{"n": i}}
	}
	b.write(t, events...)
	b.start(t, fastConfig())
	testenv.Eventually(t, 20*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == entities },
		"all %d events SUCCESS", entities)
	require.NoError(t, spy.Flush())
	require.NoError(t, sub.Unsubscribe())
	n := requests.Load()
	t.Logf("%d JetStream API requests for %d distinct subjects", n, entities)
	require.Less(t, n, int64(10), "JetStream API requests for %d distinct subjects", entities)
	requireOnceInOrder(t, b.received(t), entities)
}
