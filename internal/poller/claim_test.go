package poller_test

import (
	"context"
	"net/url"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

func TestRolledBackEventsAreNeverPublished(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.start(t, fastConfig())
	ctx := context.Background()

	rolledBack, err := b.db.Beginx()
	require.NoError(t, err)
	_, err = b.w.Write(ctx, rolledBack, changes(b.prefix+".order.rolledback", 3, 2)...)
	require.NoError(t, err)
	require.NoError(t, rolledBack.Rollback())
	committed := changes(b.prefix+".order.committed", 3, 2)
	b.write(t, committed...)

	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(committed) },
		"the committed transaction's %d events SUCCESS", len(committed))
	require.Equal(t, len(committed), b.db.Int(t, `SELECT count(*) FROM events`),
		"a rolled-back transaction left rows")
	msgs := b.received(t)
	requireOnceInOrder(t, msgs, len(committed))
	for _, m := range msgs {
		require.Equal(t, b.prefix+".order.committed", m.Subject())
	}
}

// An event whose transaction commits after a later-seq event was published
// is still published: the loop keeps no high-water mark.
func TestLateCommitIsPublished(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.start(t, fastConfig())
	ctx := context.Background()

	late, err := b.db.Beginx()
	require.NoError(t, err)
	t.Cleanup(func() { _ = late.Rollback() })
	lateIDs, err := b.w.Write(ctx, late, outbox.Event{
		EntityType: "order", EntityID: "a", Type: "Created", Subject: b.prefix + ".order.a", Data: map[string]int{},
	})
	require.NoError(t, err)
	b.write(t, outbox.Event{
		EntityType: "order", EntityID: "b", Type: "Created", Subject: b.prefix + ".order.b", Data: map[string]int{},
	})
	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == 1 },
		"the early commit SUCCESS")
	var lateSeq, earlySeq int64
	require.NoError(t, b.db.Get(&earlySeq, `SELECT seq FROM events WHERE event_status = 'SUCCESS'`))

	require.NoError(t, late.Commit())
	require.NoError(t, b.db.Get(&lateSeq, `SELECT seq FROM events WHERE event_id = $1`, lateIDs[0]))
	require.Less(t, lateSeq, earlySeq, "the late transaction's event must have the lower seq")
	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == 2 },
		"the late commit SUCCESS")
	msgs := b.received(t)
	requireOnceInOrder(t, msgs, 2)
	require.True(t, streamIDs(msgs)[lateIDs[0].String()], "late event not in the stream")
}

// A role or database whose default_transaction_isolation is SERIALIZABLE or
// REPEATABLE READ does not change the loop's transactions: with writers
// inserting all along, no mark fails after its batch was sent (under
// SERIALIZABLE about one in four did, and the batch was sent again) and
// the loop never backs off.
func TestLoopIgnoresTheDefaultIsolationLevel(t *testing.T) {
	t.Parallel()
	for _, level := range []string{"serializable", "repeatable read"} {
		t.Run(level, func(t *testing.T) {
			t.Parallel()
			b := setup(t)
			dsn := b.db.DSN + "&default_transaction_isolation=" + url.QueryEscape(level)
			db, err := sqlx.Open("postgres", dsn)
			require.NoError(t, err)
			t.Cleanup(func() { db.Close() })
			cfg := fastConfig()
			cfg.DB, cfg.DSN = db.DB, dsn
			p := b.start(t, cfg)
			const writers, each = 8, 40
			var wg sync.WaitGroup
			for w := range writers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for range each {
						b.write(t, ofEntities(b.prefix+".order.changed", "e"+strconv.Itoa(w))...)
					}
				}()
			}
			wg.Wait()
			testenv.Eventually(t, 30*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == writers*each },
				"all %d events published", writers*each)
			requireOnceInOrder(t, b.received(t), writers*each)
			require.Zero(t, p.Stats().Backoffs, "the loop backed off (a claim or mark failed)")
		})
	}
}
