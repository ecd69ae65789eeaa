package poller_test

import (
	"fmt"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// partitioned returns fastConfig with partitions and a replica id.
func partitioned(count int, id string) poller.Config {
	cfg := fastConfig()
	cfg.Partitions, cfg.ReplicaID = count, id
	return cfg
}

// replica is one partitioned poller of a test, on its own NATS connection.
type replica struct {
	*poller.Poller
	stop func() error
}

func (b *bundle) replica(t *testing.T, cfg poller.Config) replica {
	t.Helper()
	cfg.NATS, _ = testenv.NATS(t)
	p, stop := b.run(t, cfg)
	return replica{p, stop}
}

// requireShares waits until the replicas hold the given numbers of
// partitions and the lease table agrees.
func requireShares(t *testing.T, b *bundle, rs []replica, want ...int) {
	t.Helper()
	testenv.Eventually(t, 15*time.Second, func() bool {
		for i, r := range rs {
			if r.Stats().Partitions != want[i] {
				return false
			}
		}
		return true
	}, "replicas hold %v partitions", want)
	total := 0
	for _, n := range want {
		total += n
	}
	require.Equal(t, total, b.db.Int(t, `SELECT count(DISTINCT part) FROM events_leases WHERE expires_at > now()`))
}

// partitionOf is the SQL partition of entity order/id, as the claim sees it.
func partitionOf(t *testing.T, b *bundle, id string, count int) int {
	return b.db.Int(t, `SELECT (((hashtextextended('order/' || $1, 0) % $2) + $2) % $2)::int`, id, count)
}

// Three partitioned replicas share the partitions evenly and each publishes;
// when one stops, the other two take its share; when a new one joins, the
// shares even out again. Every event arrives once, in per-entity order,
// and a poison entity blocks only itself.
func TestPartitionsShareAndRebalance(t *testing.T) {
	t.Parallel()
	b := setup(t)
	const count = 12
	rs := []replica{
		b.replica(t, partitioned(count, "r1")),
		b.replica(t, partitioned(count, "r2")),
		b.replica(t, partitioned(count, "r3")),
	}
	requireShares(t, b, rs, 4, 4, 4)

	subject := b.prefix + ".order.changed"
	poison := []outbox.Event{
		{EntityType: "order", EntityID: "poison", Type: "Changed", Subject: b.prefix + "x.nostream", Data: map[string]int{"n": 0}},
		{EntityType: "order", EntityID: "poison", Type: "Changed", Subject: subject, Data: map[string]int{"n": 1}},
	}
	b.write(t, poison...)
	first := changes(subject, 40, 10)
	b.write(t, first...)
	testenv.Eventually(t, 20*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(first) },
		"all %d events but the poison entity's SUCCESS", len(first))
	for i, r := range rs {
		require.Positive(t, r.Stats().Published, "replica %d publishes its share", i+1)
	}
	testenv.Eventually(t, 10*time.Second, func() bool {
		return b.db.Int(t, `SELECT count(*) FROM events WHERE entity_id = 'poison' AND event_status = 'FAILED'`) == 1
	}, "the poison event FAILED")
	require.Equal(t, 1, b.db.Int(t, `SELECT count(*) FROM events WHERE entity_id = 'poison' AND event_status = 'READY'`),
		"the poison entity's later event waits behind it")

	// One leaves: it deletes its rows, and the others take its share at
	// their next round.
	require.NoError(t, rs[2].stop())
	require.Zero(t, b.db.Int(t, `SELECT count(*) FROM events_leases WHERE owner = 'r3'`), "a stopped replica's leases are deleted")
	require.Zero(t, b.db.Int(t, `SELECT count(*) FROM events_replicas WHERE replica_id = 'r3'`), "a stopped replica's row is deleted")
	requireShares(t, b, rs[:2], 6, 6)
	second := changes(subject, 40, 5)
	b.write(t, second...)

	// One joins: shares even out while events flow.
	rs = append(rs[:2], b.replica(t, partitioned(count, "r4")))
	requireShares(t, b, rs, 4, 4, 4)
	third := changes(subject, 40, 5)
	b.write(t, third...)

	total := len(first) + len(second) + len(third)
	testenv.Eventually(t, 20*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == total },
		"all %d events SUCCESS", total)
	requireOnceInOrder(t, b.received(t), total)
}

// A lease taken over by another owner fences the replica out of that
// partition at once: its entities wait while the rest flow, and the replica
// takes the lease back when it is free again.
func TestPartitionLeaseFence(t *testing.T) {
	t.Parallel()
	b := setup(t)
	const count = 4
	r := b.replica(t, partitioned(count, "r1"))
	requireShares(t, b, []replica{r}, count)

	// Another owner holds partition 0 (as after this replica stalled past
	// its lease).
	b.db.MustExec(`UPDATE events_leases SET owner = 'intruder', expires_at = now() + interval '1 hour' WHERE part = 0`)
	testenv.Eventually(t, 10*time.Second, func() bool { return r.Stats().Partitions == count-1 },
		"the replica lets partition 0 go")

	subject := b.prefix + ".order.changed"
	events := changes(subject, 20, 5)
	b.write(t, events...)
	fenced := 0
	for e := range 20 {
		if partitionOf(t, b, fmt.Sprint(e), count) == 0 {
			fenced += 5
		}
	}
	require.Positive(t, fenced, "some entity hashes to partition 0")
	testenv.Eventually(t, 20*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(events)-fenced },
		"every event outside partition 0 SUCCESS")
	time.Sleep(time.Second)
	require.Equal(t, fenced, b.db.Count(t, "READY"), "partition 0's events wait for their owner")

	b.db.MustExec(`DELETE FROM events_leases WHERE owner = 'intruder'`)
	requireShares(t, b, []replica{r}, count)
	testenv.Eventually(t, 20*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(events) },
		"all events SUCCESS once the lease is back")
	requireOnceInOrder(t, b.received(t), len(events))
}

// A single leader and partitioned replicas never publish at once, and
// replicas with another partition count take no lease while one is held.
func TestPartitionModesExclude(t *testing.T) {
	t.Parallel()
	b := setup(t)
	single := b.replica(t, fastConfig())
	testenv.Eventually(t, 10*time.Second, func() bool { return single.Stats().Leader }, "the single leader leads")

	four := b.replica(t, partitioned(4, "four"))
	subject := b.prefix + ".order.changed"
	first := changes(subject, 10, 5)
	b.write(t, first...)
	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(first) },
		"the single leader publishes")
	require.False(t, four.Stats().Leader, "a partitioned replica stands by while a single leader leads")
	require.Zero(t, four.Stats().Published)

	require.NoError(t, single.stop())
	requireShares(t, b, []replica{four}, 4)

	eight := b.replica(t, partitioned(8, "eight"))
	testenv.Eventually(t, 10*time.Second, func() bool { return eight.Stats().Leader }, "the 8-partition replica joins")
	second := changes(subject, 10, 5)
	b.write(t, second...)
	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(first)+len(second) },
		"the 4-partition replica publishes")
	require.Zero(t, eight.Stats().Partitions, "no lease while another partition count holds them")
	require.Zero(t, eight.Stats().Published)

	require.NoError(t, four.stop())
	requireShares(t, b, []replica{eight}, 8)
	third := changes(subject, 10, 5)
	b.write(t, third...)
	total := len(first) + len(second) + len(third)
	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == total },
		"the 8-partition replica publishes")
	requireOnceInOrder(t, b.received(t), total)
}

// A publisher restarted under the same replica id before its leases expired
// (a crashed process whose service manager starts it again) claims from
// them: it finds rows naming it that it did not take in this life, passes
// their barriers, and publishes. Before, its heartbeat renewed them for
// ever while it claimed from none, and nobody else could take them.
func TestLeasesOfAnEarlierLifeAreClaimed(t *testing.T) {
	t.Parallel()
	b := setup(t)
	const count = 4
	b.db.MustExec(`INSERT INTO events_replicas (replica_id, partitions) VALUES ('r1', $1)`, count)
	b.db.MustExec(`INSERT INTO events_leases (part, partitions, owner, expires_at)
		SELECT k, $1, 'r1', now() + interval '1 minute' FROM generate_series(0, $1 - 1) k`, count)
	r := b.replica(t, partitioned(count, "r1"))
	requireShares(t, b, []replica{r}, count)

	events := changes(b.prefix+".order.changed", 20, 3)
	b.write(t, events...)
	testenv.Eventually(t, 20*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(events) },
		"all events SUCCESS")
	requireOnceInOrder(t, b.received(t), len(events))
}

// A replica frozen inside its lease round holds the round's lock in an
// open transaction (here the test holds it, as such a replica would). The
// others' rounds must time out instead of waiting for it, and they must go
// on publishing the leases they hold; once the lock is free, rounds resume
// and a replica that joined meanwhile gets its share.
func TestFrozenLeaseRoundStallsNobody(t *testing.T) {
	t.Parallel()
	b := setup(t)
	const count = 4
	var logs testenv.SyncBuffer
	cfg := partitioned(count, "r1")
	cfg.Logger = slog.New(slog.NewTextHandler(io.MultiWriter(testWriter{t}, &logs), &slog.HandlerOptions{Level: slog.LevelDebug}))
	r1 := b.replica(t, cfg)
	requireShares(t, b, []replica{r1}, count)

	frozen, err := b.db.Beginx()
	require.NoError(t, err)
	t.Cleanup(func() { frozen.Rollback() }) //nolint:errcheck
	_, err = frozen.Exec(`SELECT pg_advisory_xact_lock(x'6f627835'::int, 'events'::regclass::oid::int)`)
	require.NoError(t, err)
	locked := len(logs.String())
	tried := func() bool {
		return strings.Contains(logs.String()[locked:], "lease round") ||
			b.db.Int(t, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
				AND classid = x'6f627835'::int::oid AND objid = 'events'::regclass::oid AND objsubid = 2`) > 0
	}
	testenv.Eventually(t, 10*time.Second, tried, "r1 tries a lease round while the frozen one holds its lock")

	r2 := b.replica(t, partitioned(count, "r2"))
	events := changes(b.prefix+".order.changed", 20, 5)
	b.write(t, events...)
	testenv.Eventually(t, 20*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(events) },
		"r1 publishes the partitions it holds while lease rounds cannot run")
	testenv.Eventually(t, 10*time.Second, func() bool { return strings.Contains(logs.String(), "lease round failed") },
		"r1's lease round times out")
	require.Zero(t, r2.Stats().Partitions, "no lease is taken while the round's lock is held")

	require.NoError(t, frozen.Rollback())
	requireShares(t, b, []replica{r1, r2}, count/2, count/2)
	more := changes(b.prefix+".order.changed", 20, 5)
	b.write(t, more...)
	testenv.Eventually(t, 20*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(events)+len(more) },
		"both replicas publish once rounds resume")
	requireOnceInOrder(t, b.received(t), len(events)+len(more))
}
