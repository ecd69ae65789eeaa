package poller_test

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/schema"
)

// A publisher with nothing to do goes to sleep on the sleep lock; an insert
// then NOTIFYs it, and the event is published long before the fallback poll
// would have found it. Per poll, the publisher would wait an hour here.
func TestNotifyWakesASleepingPublisher(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cfg := fastConfig()
	cfg.PollInterval = time.Hour
	b.start(t, cfg)

	for round := range 3 {
		testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Sleeping(t) },
			"round %d: the idle publisher sleeps", round)
		b.write(t, changes(b.prefix+".order.changed", 1, 1)...)
		testenv.Eventually(t, 20*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == round+1 },
			"round %d: the NOTIFY woke the publisher", round)
	}
}

// With --no-listen the publisher never takes the sleep lock, so writers
// never NOTIFY; it finds events by polling.
func TestPollOnlyPublisherNeverSleepsOnTheLock(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cfg := fastConfig()
	cfg.NoListen = true
	b.start(t, cfg)
	b.write(t, changes(b.prefix+".order.changed", 2, 5)...)
	testenv.Eventually(t, 20*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == 10 }, "polled and published")
	// Watch it idle for four times as long as a listening publisher takes
	// to fall asleep: it never takes the lock.
	for end := time.Now().Add(time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		require.False(t, b.db.Sleeping(t), "a poll-only publisher took the sleep lock")
	}
}

// An idle partitioned publisher sleeps as a single leader does. Leaving its
// sleep it NOTIFYs, so that peers sleeping on its lock look again; that
// NOTIFY must not wake the publisher itself, or it spins (sleep lock, look,
// unlock and notify, at once again) using a core while idle.
func TestIdlePartitionedPublisherIsNotWokenByItsOwnNotify(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cfg := partitioned(4, "r1")
	cfg.PollInterval = time.Hour
	b.start(t, cfg)
	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Sleeping(t) }, "the idle publisher sleeps")

	l := pq.NewListener(b.db.DSN, 100*time.Millisecond, time.Second, nil)
	t.Cleanup(func() { l.Close() })
	oid := b.db.Int(t, `SELECT to_regclass('events')::oid::int`)
	require.NoError(t, l.Listen(schema.Channel(int64(oid))))
	notifies := 0
	for end := time.After(2 * time.Second); ; {
		select {
		case n := <-l.Notify:
			if n != nil {
				notifies++
			}
			continue
		case <-end:
		}
		break
	}
	// It wakes for its lease rounds (every LeaderTimeout/5 = 400ms), about
	// 5 times in 2 s; spinning, it sent thousands.
	require.Less(t, notifies, 30, "NOTIFYs sent by an idle publisher in 2 s")
}

// When the lock session dies while the publisher is active, it does not
// retry the sleep lock on the dead session in a tight loop until its
// heartbeat notices: it polls at the poll interval meanwhile.
func TestDeadLockSessionDoesNotSpinOnTheSleepLock(t *testing.T) {
	t.Parallel()
	b := setup(t)
	var logs testenv.SyncBuffer
	cfg := fastConfig()
	cfg.LeaderTimeout = 20 * time.Second // heartbeat every 4 s: the window to look at
	cfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	p := b.start(t, cfg)
	testenv.Eventually(t, 10*time.Second, func() bool { return p.Stats().Leader }, "the poller leads")

	events := changes(b.prefix+".order.changed", 5, 2)
	b.write(t, events...)
	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(events) },
		"the poller publishes")
	// Active now (it just found work); end its lock session.
	require.Equal(t, 1, b.db.Int(t, `SELECT count(pg_terminate_backend(pid)) FROM pg_locks
		WHERE locktype = 'advisory' AND classid = x'6f627831'::bigint::oid
		  AND objid = 'events'::regclass::oid AND granted`))
	time.Sleep(2 * time.Second)
	tries := strings.Count(logs.String(), "take sleep lock")
	t.Logf("%d sleep-lock tries in 2 s on a dead session", tries)
	require.Positive(t, tries, "the poller went idle and tried the sleep lock on the dead session")
	require.Less(t, tries, 30, "sleep-lock tries in 2 s on a dead session")
}

// scans is how many scans PostgreSQL counted on the test's events table:
// each probe and claim of the publisher makes one or more. The counts reach
// the statistics up to a second late.
func (b *bundle) scans(t *testing.T) int {
	return b.db.Int(t, `SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables
		WHERE relid = to_regclass('events')`)
}

// A writer transaction that inserted an event while the publisher was busy
// keeps the sleep lock from being taken for as long as it stays open. The
// idle publisher polls for its commit meanwhile, but less and less often:
// over a few seconds it queries the table about as often as an idle
// publisher does, not every millisecond. Once the writer commits, its event
// is published.
func TestOpenWriterTransactionKeepsIdleCostBounded(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cfg := fastConfig()
	cfg.PollInterval = 500 * time.Millisecond
	b.start(t, cfg)
	subject := b.prefix + ".order.changed"

	// Insert while the publisher does not hold the sleep lock, just after
	// it published: the trigger then takes the lock's key shared and sends
	// no NOTIFY.
	var tx *sqlx.Tx
	for try := 1; tx == nil; try++ {
		require.LessOrEqual(t, try, 10, "the writer never found the publisher awake")
		b.write(t, changes(subject, 1, 1)...)
		testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == try },
			"try %d: the publisher publishes", try)
		w, err := b.db.Beginx()
		require.NoError(t, err)
		_, err = b.w.Write(context.Background(), w, changes(subject, 1, 1)...)
		require.NoError(t, err)
		var skipped bool
		require.NoError(t, w.Get(&skipped, `SELECT EXISTS (SELECT 1 FROM pg_locks
			WHERE locktype = 'advisory' AND classid = $1::bigint::oid AND objid = to_regclass('events')
			  AND objsubid = 2 AND mode = 'ShareLock' AND granted AND pid = pg_backend_pid())`,
			schema.SleepLockNamespace))
		if skipped {
			tx = w
			continue
		}
		require.NoError(t, w.Rollback()) // the publisher slept: this insert notified
	}
	t.Cleanup(func() { _ = tx.Rollback() })
	published := b.db.Count(t, "SUCCESS")

	// Let it go idle and find the lock taken, then count over a window.
	time.Sleep(1500 * time.Millisecond)
	before := b.scans(t)
	time.Sleep(3 * time.Second)
	n := b.scans(t) - before
	t.Logf("%d scans of the events table in 3 s while a writer transaction stayed open", n)
	// At the poll interval, 6 probes; polling every millisecond, thousands.
	require.Less(t, n, 60, "scans of the events table in 3 s by an idle publisher")

	require.NoError(t, tx.Commit())
	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == published+1 },
		"the event of the long transaction is published once it commits")
}

// A NOTIFY sent while the LISTEN connection is down is lost: PostgreSQL
// queues nothing for a session that is gone. The publisher must look again
// once the connection is back, not sleep until the fallback poll (an hour
// here). Each round ends the listening backend while the publisher sleeps,
// commits an event as soon as that backend is gone (before or after the
// listener reconnects, whichever the race gives), and expects it published.
func TestEventWrittenWhileListenConnectionIsDownIsPublished(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cfg := fastConfig()
	cfg.PollInterval = time.Hour
	b.start(t, cfg)
	listen := `LISTEN ` + pq.QuoteIdentifier(schema.Channel(int64(b.db.Int(t, `SELECT to_regclass('events')::oid::int`))))

	for round := range 4 {
		testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Sleeping(t) },
			"round %d: the idle publisher sleeps", round)
		var pid int
		testenv.Eventually(t, 10*time.Second, func() bool {
			return b.db.Get(&pid, `SELECT pid FROM pg_stat_activity WHERE query = $1`, listen) == nil
		}, "round %d: the publisher's listening backend is found", round)
		require.Equal(t, 1, b.db.Int(t, `SELECT count(pg_terminate_backend($1))`, pid))
		testenv.Eventually(t, 10*time.Second, func() bool {
			return b.db.Int(t, `SELECT count(*) FROM pg_stat_activity WHERE pid = $1`, pid) == 0
		}, "round %d: the listening backend is gone", round)
		b.write(t, changes(b.prefix+".order.changed", 1, 1)...)
		testenv.Eventually(t, 20*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == round+1 },
			"round %d: the event committed while the listener was down is published", round)
	}
}

// While the publisher sleeps, its sleep lock lives on its lock session.
// When that session dies, writers find the lock free and send no NOTIFY;
// the publisher must still find their events (here it would otherwise
// sleep for the hour of its fallback poll).
func TestEventWrittenAfterTheSleepingLockSessionDiedIsPublished(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cfg := fastConfig()
	cfg.PollInterval = time.Hour
	b.start(t, cfg)
	for round := range 2 {
		testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Sleeping(t) },
			"round %d: the idle publisher sleeps", round)
		require.Equal(t, 1, b.db.Int(t, `SELECT count(pg_terminate_backend(pid)) FROM pg_locks
			WHERE locktype = 'advisory' AND classid = $1::bigint::oid
			  AND objid = to_regclass('events')::oid AND objsubid = 2 AND granted`, schema.SleepLockNamespace))
		testenv.Eventually(t, 10*time.Second, func() bool { return !b.db.Sleeping(t) },
			"round %d: the sleep lock died with its session", round)
		b.write(t, changes(b.prefix+".order.changed", 1, 1)...)
		testenv.Eventually(t, 20*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == round+1 },
			"round %d: the event written after the lock session died is published", round)
	}
}
