package poller_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// Rows locked by someone else (an operator's open transaction, a requeue
// in progress) are skipped: the events of other entities behind them are
// published, and no later event of a locked row's entity goes out ahead of
// it.
func TestRowsLockedByAnotherSession(t *testing.T) {
	t.Parallel()
	// batch 5: the locked rows fill the claim's window; batch 100: the
	// claim takes the locked rows' later events.
	for _, batch := range []int{5, 100} {
		t.Run(fmt.Sprint("batch ", batch), func(t *testing.T) {
			t.Parallel()
			rowsLocked(t, batch)
		})
	}
}

func rowsLocked(t *testing.T, batch int) {
	b := setup(t)
	subject := b.prefix + ".order.changed"
	ev := func(entity string, n int) outbox.Event {
		return outbox.Event{EntityType: "order", EntityID: entity, Type: "Changed", Subject: subject, Data: map[string]int{"n": n}}
	}
	var first, second, others []outbox.Event
	for i := range 5 {
		first = append(first, ev(fmt.Sprint("a", i), 1))
		second = append(second, ev(fmt.Sprint("a", i), 2))
		others = append(others, ev(fmt.Sprint("b", i), 1))
	}
	b.write(t, first...)
	locker, err := b.db.Beginx()
	require.NoError(t, err)
	t.Cleanup(func() { _ = locker.Rollback() })
	_, err = locker.Exec(`SELECT 1 FROM events FOR UPDATE`)
	require.NoError(t, err)
	b.write(t, second...)
	b.write(t, others...)
	cfg := fastConfig()
	cfg.BatchSize = batch
	b.start(t, cfg)
	testenv.Eventually(t, 15*time.Second, func() bool {
		return b.db.Int(t, `SELECT count(*) FROM events WHERE entity_id LIKE 'b%' AND event_status = 'SUCCESS'`) == 5
	}, "the other entities' events are published past the locked rows")
	require.Zero(t, b.db.Int(t, `SELECT count(*) FROM events WHERE entity_id LIKE 'a%' AND event_status = 'SUCCESS'`),
		"no later event of a locked row's entity is published ahead of it")
	require.NoError(t, locker.Rollback())
	testenv.Eventually(t, 15*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == 15 }, "all published")
	requireOnceInOrder(t, b.received(t), 15)
}
