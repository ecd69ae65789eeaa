package poller_test

import (
	"context"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// A stream that is away for a moment while a batch is sent (deleted and
// recreated here; a clustered stream changing leader looks the same to the
// client) must not get an entity's events out of order: nothing below the
// loop may retry a publish on its own timer. Every event refused during the
// gap goes back through the loop, which sends the entity's events again in
// seq order.
func TestStreamGapKeepsEntityOrder(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cfg := fastConfig()
	cfg.BatchSize = 500
	cfg.MaxAttempts = 1000 // the gap may cost attempts; it must not cost events
	// The loop's own retries come long after the stream is back, so they
	// cannot race its return.
	cfg.RetryBase, cfg.RetryMax, cfg.BackoffMin, cfg.BackoffMax = time.Second, time.Second, time.Second, time.Second
	p := b.start(t, cfg)
	subject := b.prefix + ".order.changed"

	// One event first, so the publisher knows the subject's stream and sends
	// the next batch without asking JetStream again.
	b.write(t, changes(subject, 1, 1)...)
	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == 1 }, "warm-up event SUCCESS")

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	info, err := b.stream.Info(ctx)
	require.NoError(t, err)
	sc := info.Config
	require.NoError(t, b.js.DeleteStream(ctx, sc.Name))

	events := changes(subject, 16, 30)
	sent := b.nc.Stats().OutMsgs
	b.write(t, events...)
	// The stream comes back as soon as the batch is out (the publisher
	// shares the test's connection, which counts what it sends), well
	// within nats.go's default retry wait of 250ms.
	testenv.Eventually(t, 10*time.Second, func() bool { return b.nc.Stats().OutMsgs >= sent+uint64(len(events)) },
		"the batch is sent during the gap")
	_, err = b.js.CreateStream(ctx, sc)
	require.NoError(t, err)

	total := len(events) + 1
	testenv.Eventually(t, 30*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == total },
		"all %d events SUCCESS once the stream is back", total)
	require.Zero(t, b.db.Count(t, "FAILED"))
	msgs := b.received(t)
	requireOnceInOrder(t, msgs, len(events)) // the warm-up event went with the old stream
	require.Positive(t, p.Stats().Refused+p.Stats().Backoffs, "the batch must have met the gap")
}

// A replay meeting a stream that is away for a moment must not store an
// entity's events out of order either (a replay rebuilds consumers' state,
// which depends on that order): it stops at the failure, or goes on in
// order, but the client never retries a publish on its own timer.
func TestReplayStreamGapKeepsEntityOrder(t *testing.T) {
	t.Parallel()
	b := setup(t)
	subject := b.prefix + ".order.changed"
	events := changes(subject, 16, 30)
	b.write(t, events...)
	b.db.MustExec(`UPDATE events SET event_status = 'SUCCESS', published_at = now()`)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	info, err := b.stream.Info(ctx)
	require.NoError(t, err)
	sc := info.Config
	require.NoError(t, b.js.DeleteStream(ctx, sc.Name))
	done := make(chan error, 1)
	sent := b.nc.Stats().OutMsgs
	go func() {
		_, err := poller.Replay(ctx, b.db.DB.DB, b.js, "events", poller.ReplayFilter{FromSeq: 1},
			poller.ReplayOptions{RunID: "gap", MaxInFlight: len(events), AckTimeout: 5 * time.Second}, nil)
		done <- err
	}()
	// The stream comes back as soon as every event is out (the replay
	// sends on the test's connection, which counts them), well within
	// nats.go's default retry wait of 250ms: a fixed pause could end in
	// the middle of the sends on a loaded machine, and an entity's events
	// sent before and after it would be stored out of order without any
	// client retry.
	testenv.Eventually(t, 10*time.Second, func() bool { return b.nc.Stats().OutMsgs >= sent+uint64(len(events)) },
		"the replay is sent during the gap")
	_, err = b.js.CreateStream(ctx, sc)
	require.NoError(t, err)
	err = <-done
	t.Logf("replay: %v", err)

	last := map[string]int64{}
	for _, m := range b.received(t) {
		h := m.Headers()
		seq, err := strconv.ParseInt(h.Get(outbox.HeaderSeq), 10, 64)
		require.NoError(t, err)
		ent := h.Get(outbox.HeaderEntityID)
		require.Greater(t, seq, last[ent], "entity %s out of order in the replay", ent)
		last[ent] = seq
	}
}

// An event refused after a later event of its entity was sent in the same
// batch (sent together, before any answer) breaks the entity's order. The
// loop cannot undo that; it logs it, naming both events, and counts it. (A
// later event in the next batch is not sent before the refused one's
// answer: TestFailedBatchAheadHoldsTheNextBatchBack.)
func TestOrderBrokenByALateRefusalIsLoggedAndCounted(t *testing.T) {
	t.Parallel()
	b := setup(t)
	slow := "p" + testenv.Suffix() + ".order.slow"
	r := b.jsResponder(t, slow, 10071, 300*time.Millisecond) // wrong last sequence, 300ms after the send

	var logs testenv.SyncBuffer
	cfg := fastConfig()
	cfg.Metrics = poller.NewMetrics() // both events in one batch: the second is sent while the first waits
	cfg.Logger = slog.New(slog.NewTextHandler(io.MultiWriter(&logs, testWriter{t}), nil))
	p := b.start(t, cfg)
	b.warmUp(t)
	r.arm(t)

	b.write(t,
		outbox.Event{EntityType: "order", EntityID: "1", Type: "Created", Subject: slow, Data: map[string]int{"n": 1}},
		outbox.Event{EntityType: "order", EntityID: "1", Type: "Changed", Subject: b.prefix + ".order.changed", Data: map[string]int{"n": 2}})
	testenv.Eventually(t, 10*time.Second, func() bool {
		return b.db.Count(t, "SUCCESS") == 2 && b.db.Int(t, `SELECT count(*) FROM events WHERE attempts > 0`) == 1
	}, "the second event stored, the first refused")
	ids := b.db.IDs(t, "")[1:] // after the warm-up event
	testenv.Eventually(t, 5*time.Second, func() bool { return strings.Contains(logs.String(), "the entity's order is broken") },
		"the broken order is logged")
	require.Contains(t, logs.String(), "earlier_event_id="+ids[0])
	require.EqualValues(t, 1, p.Stats().OrderViolations)
	require.EqualValues(t, 1, testutil.ToFloat64(cfg.Metrics.OrderViolations))
}

// An earlier event locked by another session (an operator's SELECT … FOR
// UPDATE, a long UPDATE, a migration) cannot be claimed; its entity's later
// events must wait for it rather than be sent ahead of it, while other
// entities flow. Once the lock is gone, the entity goes out in order.
func TestEventLockedByAnotherSessionHoldsBackItsEntity(t *testing.T) {
	t.Parallel()
	b := setup(t)
	subject := b.prefix + ".order.changed"
	ev := func(entity string, n int) outbox.Event {
		return outbox.Event{EntityType: "order", EntityID: entity, Type: "Changed", Subject: subject, Data: map[string]int{"n": n}}
	}
	b.write(t, ev("locked", 1))
	lock, err := b.db.Beginx()
	require.NoError(t, err)
	t.Cleanup(func() { _ = lock.Rollback() })
	var locked string
	require.NoError(t, lock.Get(&locked, `SELECT event_id::text FROM events WHERE entity_id = 'locked' FOR UPDATE`))

	p := b.start(t, fastConfig())
	b.write(t, ev("locked", 2), ev("locked", 3), ev("free", 1))
	b.write(t, ev("free", 2)) // a later claim, past the held events
	testenv.Eventually(t, 10*time.Second, func() bool {
		return b.db.Int(t, `SELECT count(*) FROM events WHERE entity_id = 'free' AND event_status = 'SUCCESS'`) == 2
	}, "the other entity is published")
	require.Equal(t, 3, b.db.Int(t, `SELECT count(*) FROM events WHERE entity_id = 'locked' AND event_status = 'READY'`),
		"the locked event's entity must wait")
	for _, m := range b.received(t) {
		require.NotEqual(t, "locked", m.Headers().Get(outbox.HeaderEntityID), "an event was sent ahead of an earlier one")
	}

	require.NoError(t, lock.Rollback())
	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == 5 },
		"everything published once the lock is gone")
	msgs := b.received(t)
	requireOnceInOrder(t, msgs, 5)
	require.Equal(t, locked, msgs[2].Headers().Get(outbox.HeaderEventID), "the locked event goes first of its entity")
	require.Zero(t, p.Stats().OrderViolations)
}

// Once JetStream has failed to store a message, the loop is careful: it
// does not send an entity's next event until the earlier one is stored.
// The late refusal that broke the order in
// TestOrderBrokenByALateRefusalIsLoggedAndCounted then breaks nothing: the
// later event waits behind the refused one.
func TestCarefulAfterAFailureSendsNothingAheadOfAnUnstoredEvent(t *testing.T) {
	t.Parallel()
	b := setup(t)
	tag := testenv.Suffix()
	refusing, slow := "p"+tag+".order.refused", "q"+tag+".order.slow"
	r1 := b.jsResponder(t, refusing, 10071, 0)
	r2 := b.jsResponder(t, slow, 10071, 300*time.Millisecond)

	var logs testenv.SyncBuffer
	cfg := fastConfig()
	cfg.BatchSize = 1
	cfg.MaxAttempts = 1000
	cfg.Logger = slog.New(slog.NewTextHandler(io.MultiWriter(&logs, testWriter{t}), nil))
	p := b.start(t, cfg)
	b.warmUp(t)
	r1.arm(t)
	r2.arm(t)

	// An event JetStream keeps refusing keeps the loop careful.
	b.write(t, outbox.Event{EntityType: "order", EntityID: "0", Type: "Created", Subject: refusing, Data: map[string]int{"n": 1}})
	testenv.Eventually(t, 10*time.Second, func() bool { return strings.Contains(logs.String(), "sending one event per entity per batch") },
		"the loop turns careful")

	b.write(t,
		outbox.Event{EntityType: "order", EntityID: "1", Type: "Created", Subject: slow, Data: map[string]int{"n": 1}},
		outbox.Event{EntityType: "order", EntityID: "1", Type: "Changed", Subject: b.prefix + ".order.changed", Data: map[string]int{"n": 2}},
		outbox.Event{EntityType: "order", EntityID: "2", Type: "Changed", Subject: b.prefix + ".order.changed", Data: map[string]int{"n": 1}})
	testenv.Eventually(t, 10*time.Second, func() bool {
		return b.db.Int(t, `SELECT count(*) FROM events WHERE entity_id = '1' AND attempts > 0`) == 1 &&
			b.db.Count(t, "SUCCESS") == 2
	}, "the slow event refused, the other entity's event stored")
	require.Zero(t, b.db.Int(t, `SELECT count(*) FROM events WHERE entity_id = '1' AND event_status = 'SUCCESS'`),
		"an event was stored ahead of an earlier one of its entity")
	require.Zero(t, p.Stats().OrderViolations)
}

// A batch whose publish failed at once must hold back the batch claimed
// behind it, from the first failure on (before the loop turns careful). A
// clustered stream changing leader answers "no responders" for a few
// milliseconds; the next batch, claimed and sent meanwhile, reaches the new
// leader and stores an entity's later event ahead of the earlier one that
// failed. The loop sends a batch only once the batch ahead has all its
// answers, and nothing behind a failure. Here the first event's stream
// refuses it at once (10071, wrong last sequence: retried); each event is
// its own batch; the second event, of the same entity, must not be stored
// while the first keeps failing.
func TestFailedBatchAheadHoldsTheNextBatchBack(t *testing.T) {
	t.Parallel()
	b := setup(t)
	away := "p" + testenv.Suffix() + ".order.away"
	r := b.jsResponder(t, away, 10071, 0)

	cfg := fastConfig()
	cfg.BatchSize = 1 // the second event is claimed while the first is in flight
	cfg.MaxAttempts = 1000
	p := b.start(t, cfg)
	b.warmUp(t)
	r.arm(t)

	b.write(t,
		outbox.Event{EntityType: "order", EntityID: "1", Type: "Created", Subject: away, Data: map[string]int{"n": 1}},
		outbox.Event{EntityType: "order", EntityID: "1", Type: "Changed", Subject: b.prefix + ".order.changed", Data: map[string]int{"n": 2}})
	testenv.Eventually(t, 20*time.Second, func() bool {
		return b.db.Int(t, `SELECT coalesce(max(attempts), 0) FROM events WHERE entity_id = '1'`) >= 3
	}, "the first event sent and refused 3 times")
	for _, m := range b.received(t) {
		require.NotEqual(t, "1", m.Headers().Get(outbox.HeaderEntityID), "the second event was stored while the first, ahead of it, failed")
	}
	require.Zero(t, p.Stats().OrderViolations)
}
