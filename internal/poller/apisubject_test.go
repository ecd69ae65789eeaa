package poller_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// An event whose subject is a JetStream API request (here: purge the
// stream) is never sent: no stream covers it, so it is refused before
// sending, and the stream keeps its messages.
func TestAPISubjectIsNeverSent(t *testing.T) {
	t.Parallel()
	b := setup(t)
	name := b.stream.CachedInfo().Config.Name
	b.write(t, outbox.Event{EntityType: "order", EntityID: "1", Type: "Changed",
		Subject: b.prefix + ".order.changed", Data: json.RawMessage(`{}`)})
	cfg := fastConfig()
	cfg.MaxAttempts = 2
	b.start(t, cfg)
	testenv.Eventually(t, 15*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == 1 }, "first event published")
	b.write(t, outbox.Event{EntityType: "order", EntityID: "2", Type: "Changed",
		Subject: "$JS.API.STREAM.PURGE." + name, Data: json.RawMessage(`{}`)})
	testenv.Eventually(t, 15*time.Second, func() bool { return b.db.Count(t, "FAILED") == 1 }, "the API subject's event FAILED")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	info, err := b.stream.Info(ctx)
	require.NoError(t, err)
	require.EqualValues(t, 1, info.State.Msgs, "the stream was not purged")
}
