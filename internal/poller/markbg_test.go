package poller_test

import (
	"database/sql"
	"io"
	"log/slog"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
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
