package poller_test

import (
	"database/sql"
	"encoding/json"
	"io"
	"log/slog"
	"strconv"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// The loop holds up to three pool connections at once (a claim, the batch
// in flight, a mark in the background): a pool capped at three drains a
// backlog, each claim waiting at most for the mark ahead of it to commit.
func TestThreeConnectionPoolDrainsABacklog(t *testing.T) {
	t.Parallel()
	b := setup(t)
	db, err := sql.Open("postgres", b.db.DSN)
	require.NoError(t, err)
	t.Cleanup(func() { db.Close() })
	db.SetMaxOpenConns(3)
	db.SetMaxIdleConns(3)

	cfg := fastConfig()
	cfg.BatchSize = 20
	cfg.DB = db
	b.start(t, cfg)
	events := changes(b.prefix+".order.changed", 10, 50)
	b.write(t, events...)
	testenv.Eventually(t, 8*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(events) }, "backlog drained")
	requireOnceInOrder(t, b.received(t), len(events))
}

// A mark that fails once (here a statement error injected on one row of a
// batch in the middle of a backlog, marked in the background while the
// next batch is claimed and sent) leaves its rows READY: they are sent
// again, and every event ends SUCCESS, once in the stream (JetStream drops
// the copy by its message id) and in its entity's order.
func TestFailedMarkSendsItsRowsAgainInOrder(t *testing.T) {
	t.Parallel()
	b := setup(t)
	events := changes(b.prefix+".order.changed", 10, 20)
	b.write(t, events...)
	target := b.db.Int(t, `SELECT seq FROM events ORDER BY seq OFFSET 54 LIMIT 1`) // in the sixth batch of ten
	b.db.MustExec(`CREATE SEQUENCE mark_failures`)
	b.db.MustExec(`CREATE FUNCTION fail_mark() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			IF OLD.seq = ` + strconv.Itoa(target) + ` THEN
				IF nextval('mark_failures') = 1 THEN
					RAISE EXCEPTION 'injected mark failure' USING ERRCODE = '40001';
				END IF;
			END IF;
			RETURN NEW;
		END $$`)
	b.db.MustExec(`CREATE TRIGGER fail_mark BEFORE UPDATE ON events FOR EACH ROW
		WHEN (NEW.event_status = 'SUCCESS') EXECUTE FUNCTION fail_mark()`)

	var logs testenv.SyncBuffer
	cfg := fastConfig()
	cfg.BatchSize = 10
	cfg.Logger = slog.New(slog.NewTextHandler(io.MultiWriter(&logs, testWriter{t}), nil))
	p := b.start(t, cfg)
	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(events) }, "every event SUCCESS")
	require.Contains(t, logs.String(), "injected mark failure")
	require.Positive(t, p.Stats().Backoffs)
	requireOnceInOrder(t, b.received(t), len(events))
	require.Zero(t, p.Stats().OrderViolations)
}

// A mark that keeps failing on a database error retrying cannot fix (the
// publisher's role lost UPDATE on the events table's status column) must be reported
// through Fault under load as it is when idle: the mark of a fully acked
// batch runs in the background, and the step that starts it must not count
// as a success that resets the count of lasting errors in a row.
func TestLastingMarkErrorUnderLoadIsReported(t *testing.T) {
	t.Parallel()
	b := setup(t)
	role, dsn := leastPrivilegeRole(t, b)
	db, err := sql.Open("postgres", dsn)
	require.NoError(t, err)
	t.Cleanup(func() { db.Close() })

	cfg := fastConfig()
	cfg.BatchSize = 10 // a backlog of many batches: the loop pipelines
	cfg.DB, cfg.DSN = db, dsn
	p := b.start(t, cfg)
	subject := b.prefix + ".order.changed"
	b.write(t, changes(subject, 1, 1)...)
	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == 1 }, "warm-up event SUCCESS")

	// The claim's FOR UPDATE needs UPDATE on some column; the mark needs it
	// on event_status and published_at.
	b.db.MustExec(`REVOKE UPDATE ON events FROM ` + role)
	b.db.MustExec(`GRANT UPDATE (attempts, last_error, available_at) ON events TO ` + role)
	b.write(t, changes(subject, 20, 50)...)
	testenv.Eventually(t, 8*time.Second, func() bool { return p.Fault() != nil }, "the lasting error is reported")
	require.Equal(t, "42501", p.Fault().Code)
}

// outbox_batch_duration_seconds is the time from the start of a batch's
// claim to the commit of its mark. A batch marked in the background must
// be timed to its commit, not to the moment the loop next looks at it:
// here a fast batch is marked while the batch behind it waits 1.5s for its
// PubAck, and only that slow batch may take over a second.
func TestBatchDurationEndsAtTheMarkInTheBackground(t *testing.T) {
	t.Parallel()
	b := setup(t)
	const late = 1500 * time.Millisecond
	slow := "p" + testenv.Suffix() + ".order.slow"
	r := b.jsResponder(t, slow, 0, late)
	ack, err := json.Marshal(map[string]any{"stream": r.stream.CachedInfo().Config.Name, "seq": 1})
	require.NoError(t, err)
	r.reply = ack // a PubAck, late

	m := poller.NewMetrics()
	cfg := fastConfig()
	cfg.BatchSize = 1 // one batch per event, the second claimed while the first is in flight
	cfg.AckTimeout = 5 * time.Second
	cfg.Metrics = m
	b.start(t, cfg)
	b.warmUp(t)
	r.arm(t)
	before, over := durations(t, m)

	b.write(t,
		outbox.Event{EntityType: "order", EntityID: "fast", Type: "Changed", Subject: b.prefix + ".order.changed", Data: 1},
		outbox.Event{EntityType: "order", EntityID: "slow", Type: "Changed", Subject: slow, Data: 1})
	testenv.Eventually(t, 10*time.Second, func() bool { n, _ := durations(t, m); return n == before+2 }, "both batches timed")
	_, overAfter := durations(t, m)
	require.Equal(t, over+1, overAfter, "batches timed over a second: only the one whose PubAck came %s late took that long", late)
}

// durations returns the number of batches outbox_batch_duration_seconds
// timed, and how many of them over a second.
func durations(t *testing.T, m *poller.Metrics) (n, overASecond uint64) {
	t.Helper()
	var d dto.Metric
	require.NoError(t, m.BatchDuration.Write(&d))
	h := d.GetHistogram()
	var under uint64
	for _, bk := range h.GetBucket() {
		if bk.GetUpperBound() <= 1.1 {
			under = bk.GetCumulativeCount()
		}
	}
	return h.GetSampleCount(), h.GetSampleCount() - under
}
