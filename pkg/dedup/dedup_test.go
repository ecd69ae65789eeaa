package dedup_test

import (
	"context"
	"errors"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/dedup"
	"github.com/pgnats/outbox/schema"
)

// bundle is a test's own database schema with the dedup table, an effects
// table the handlers write to, and a Processor on the default table.
type bundle struct {
	db *testenv.DB
	p  *dedup.Processor
}

func setup(t *testing.T) bundle {
	t.Helper()
	db := testenv.NewDB(t)
	db.MustExec(`CREATE TABLE effects (
		id          bigserial PRIMARY KEY,
		consumer_id text NOT NULL,
		message_id  text NOT NULL)`)
	p, err := dedup.New(db.DB, dedup.Config{})
	require.NoError(t, err)
	return bundle{db: db, p: p}
}

// writeEffect inserts one effects row for (consumer, msgID) in tx: the
// observable side effect of handling a message.
func writeEffect(ctx context.Context, tx *sqlx.Tx, consumer, msgID string) error {
	_, err := tx.ExecContext(ctx, `INSERT INTO effects (consumer_id, message_id) VALUES ($1, $2)`, consumer, msgID)
	return err
}

// effectHandler returns a handler writing an effect and counting its calls.
func effectHandler(consumer, msgID string, calls *atomic.Int32) func(context.Context, *sqlx.Tx) error {
	return func(ctx context.Context, tx *sqlx.Tx) error {
		calls.Add(1)
		return writeEffect(ctx, tx, consumer, msgID)
	}
}

func (b bundle) effects(t *testing.T, consumer, msgID string) int {
	t.Helper()
	var n int
	require.NoError(t, b.db.Get(&n, `SELECT count(*) FROM effects WHERE consumer_id = $1 AND message_id = $2`, consumer, msgID))
	return n
}

func (b bundle) recorded(t *testing.T, consumer, msgID string) bool {
	t.Helper()
	var ok bool
	require.NoError(t, b.db.Get(&ok, `SELECT EXISTS (SELECT 1 FROM processed_message WHERE consumer_id = $1 AND message_id = $2)`, consumer, msgID))
	return ok
}

func TestNew(t *testing.T) {
	t.Parallel()
	db := testenv.NewDB(t)

	t.Run("accepts schema-qualified table", func(t *testing.T) {
		t.Parallel()
		p, err := dedup.New(db.DB, dedup.Config{Table: db.Schema + ".processed_message"})
		require.NoError(t, err)
		res, err := p.Process(t.Context(), "billing", "m1", func(context.Context, *sqlx.Tx) error { return nil })
		require.NoError(t, err)
		require.Equal(t, dedup.Processed, res)
	})

	t.Run("uses custom table", func(t *testing.T) {
		t.Parallel()
		db.MustExec(`CREATE TABLE billing_seen (LIKE processed_message INCLUDING ALL)`)
		p, err := dedup.New(db.DB, dedup.Config{Table: "billing_seen"})
		require.NoError(t, err)
		_, err = p.Process(t.Context(), "billing", "m1", func(context.Context, *sqlx.Tx) error { return nil })
		require.NoError(t, err)
		var n int
		require.NoError(t, db.Get(&n, `SELECT count(*) FROM billing_seen WHERE consumer_id = 'billing' AND message_id = 'm1'`))
		require.Equal(t, 1, n)
	})

	for _, table := range []string{
		"processed message",
		"processed_message; DROP TABLE events",
		`"processed_message"`,
		"a.b.c",
		".processed_message",
		"1processed",
	} {
		t.Run("rejects table "+table, func(t *testing.T) {
			t.Parallel()
			_, err := dedup.New(db.DB, dedup.Config{Table: table})
			require.ErrorIs(t, err, schema.ErrInvalidName)
		})
	}

	t.Run("rejects nil database", func(t *testing.T) {
		t.Parallel()
		_, err := dedup.New(nil, dedup.Config{})
		require.Error(t, err)
	})
}

func TestProcess(t *testing.T) {
	t.Parallel()

	t.Run("first delivery runs handler and commits its writes", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		var calls atomic.Int32
		res, err := b.p.Process(t.Context(), "billing", "m1", effectHandler("billing", "m1", &calls))
		require.NoError(t, err)
		require.Equal(t, dedup.Processed, res)
		require.EqualValues(t, 1, calls.Load())
		require.Equal(t, 1, b.effects(t, "billing", "m1"))
		require.True(t, b.recorded(t, "billing", "m1"))
	})

	t.Run("redelivery is a duplicate and skips handler", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		var calls atomic.Int32
		fn := effectHandler("billing", "m1", &calls)
		res, err := b.p.Process(t.Context(), "billing", "m1", fn)
		require.NoError(t, err)
		require.Equal(t, dedup.Processed, res)
		for range 2 {
			res, err = b.p.Process(t.Context(), "billing", "m1", fn)
			require.NoError(t, err)
			require.Equal(t, dedup.Duplicate, res)
		}
		require.EqualValues(t, 1, calls.Load())
		require.Equal(t, 1, b.effects(t, "billing", "m1"))
	})

	t.Run("same message for other consumer is processed", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		var calls atomic.Int32
		for _, consumer := range []string{"billing", "shipping"} {
			res, err := b.p.Process(t.Context(), consumer, "m1", effectHandler(consumer, "m1", &calls))
			require.NoError(t, err)
			require.Equal(t, dedup.Processed, res, consumer)
			require.Equal(t, 1, b.effects(t, consumer, "m1"), consumer)
		}
		require.EqualValues(t, 2, calls.Load())
	})

	t.Run("handler error rolls back and a retry processes", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		boom := errors.New("boom")
		res, err := b.p.Process(t.Context(), "billing", "m1", func(ctx context.Context, tx *sqlx.Tx) error {
			require.NoError(t, writeEffect(ctx, tx, "billing", "m1"))
			return boom
		})
		require.ErrorIs(t, err, boom)
		require.Zero(t, res)
		require.Zero(t, b.effects(t, "billing", "m1"), "handler writes rolled back")
		require.False(t, b.recorded(t, "billing", "m1"), "message not recorded")

		var calls atomic.Int32
		res, err = b.p.Process(t.Context(), "billing", "m1", effectHandler("billing", "m1", &calls))
		require.NoError(t, err)
		require.Equal(t, dedup.Processed, res)
		require.Equal(t, 1, b.effects(t, "billing", "m1"))
	})

	t.Run("permanent handler error is returned and rolled back", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		bad := errors.New("bad payload")
		res, err := b.p.Process(t.Context(), "billing", "m1", func(ctx context.Context, tx *sqlx.Tx) error {
			require.NoError(t, writeEffect(ctx, tx, "billing", "m1"))
			return dedup.Permanent(bad)
		})
		require.ErrorIs(t, err, dedup.ErrPermanent)
		require.ErrorIs(t, err, bad)
		require.Zero(t, res)
		require.Zero(t, b.effects(t, "billing", "m1"))
		require.False(t, b.recorded(t, "billing", "m1"))
	})

	t.Run("handler swallowing an SQL error is not processed", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		res, err := b.p.Process(t.Context(), "billing", "m1", func(ctx context.Context, tx *sqlx.Tx) error {
			require.NoError(t, writeEffect(ctx, tx, "billing", "m1"))
			_, err := tx.ExecContext(ctx, `SELECT * FROM no_such_table`)
			require.Error(t, err)
			return nil // the transaction is now aborted
		})
		require.Error(t, err)
		require.Zero(t, res)
		require.Zero(t, b.effects(t, "billing", "m1"))
		require.False(t, b.recorded(t, "billing", "m1"))
	})

	t.Run("panicking handler is recovered, rolled back and logged with its stack", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		var logs testenv.SyncBuffer
		p, err := dedup.New(b.db.DB, dedup.Config{Logger: slog.New(slog.NewJSONHandler(&logs, nil))})
		require.NoError(t, err)
		var res dedup.Result
		require.NotPanics(t, func() {
			res, err = p.Process(t.Context(), "billing", "m1", func(ctx context.Context, tx *sqlx.Tx) error {
				require.NoError(t, writeEffect(ctx, tx, "billing", "m1"))
				panicInHandler()
				return nil
			})
		})
		require.ErrorIs(t, err, dedup.ErrHandlerPanic)
		var pe *dedup.PanicError
		require.ErrorAs(t, err, &pe)
		require.Equal(t, "handler bug", pe.Value)
		require.Contains(t, string(pe.Stack), "panicInHandler")
		require.Zero(t, res)
		require.Contains(t, logs.String(), `"msg":"message handler panicked; rolled back"`)
		require.Contains(t, logs.String(), "panicInHandler", "stack in the log record")
		require.Zero(t, b.effects(t, "billing", "m1"), "handler's writes rolled back")
		require.False(t, b.recorded(t, "billing", "m1"))

		var calls atomic.Int32
		res, err = p.Process(t.Context(), "billing", "m1", effectHandler("billing", "m1", &calls))
		require.NoError(t, err)
		require.Equal(t, dedup.Processed, res)
		require.Equal(t, 1, b.effects(t, "billing", "m1"))
	})

	t.Run("nil handler is refused before any SQL", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		var (
			res dedup.Result
			err error
		)
		require.NotPanics(t, func() {
			res, err = b.p.Process(t.Context(), "billing", "m1", nil)
		})
		require.ErrorIs(t, err, dedup.ErrNilHandler)
		require.Zero(t, res)
		require.False(t, b.recorded(t, "billing", "m1"), "no key recorded")
	})
}

// panicInHandler panics from a named function, so that a test can find it
// in the recorded stack.
func panicInHandler() { panic("handler bug") }

func TestProcess_invalidKey(t *testing.T) {
	t.Parallel()
	// A closed database makes any SQL fail with another error, so getting
	// a KeyError shows the key was checked before any SQL ran.
	db, err := sqlx.Open("postgres", testenv.DatabaseURL())
	require.NoError(t, err)
	require.NoError(t, db.Close())
	p, err := dedup.New(db, dedup.Config{})
	require.NoError(t, err)

	for _, tc := range []struct {
		name, consumer, msgID, field string
	}{
		{name: "empty consumer", consumer: "", msgID: "m1", field: "consumer"},
		{name: "empty message id", consumer: "billing", msgID: "", field: "msgID"},
		{name: "both empty", consumer: "", msgID: "", field: "consumer"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			called := false
			res, err := p.Process(t.Context(), tc.consumer, tc.msgID, func(context.Context, *sqlx.Tx) error {
				called = true
				return nil
			})
			require.ErrorIs(t, err, dedup.ErrInvalidKey)
			var ke *dedup.KeyError
			require.ErrorAs(t, err, &ke)
			require.Equal(t, tc.field, ke.Field)
			require.Zero(t, res)
			require.False(t, called)
		})
	}
	t.Run("nil handler", func(t *testing.T) {
		t.Parallel()
		res, err := p.Process(t.Context(), "billing", "m1", nil)
		require.ErrorIs(t, err, dedup.ErrNilHandler)
		require.Zero(t, res)
	})
}

// holdFirst returns a handler whose first call reports its transaction's
// backend pid on the returned channel and blocks until release is called,
// then returns then(ctx, tx); later calls return then(ctx, tx) at once.
// release is also called at test cleanup, so a failed test does not leave
// transactions open.
func holdFirst(t *testing.T, then func(context.Context, *sqlx.Tx) error) (fn func(context.Context, *sqlx.Tx) error, pid <-chan int, release func(), calls *atomic.Int32) {
	t.Helper()
	pids := make(chan int, 1)
	released := make(chan struct{})
	release = sync.OnceFunc(func() { close(released) })
	t.Cleanup(release)
	calls = new(atomic.Int32)
	fn = func(ctx context.Context, tx *sqlx.Tx) error {
		if calls.Add(1) == 1 {
			var p int
			if err := tx.GetContext(ctx, &p, `SELECT pg_backend_pid()`); err != nil {
				return err
			}
			pids <- p
			<-released
		}
		return then(ctx, tx)
	}
	return fn, pids, release, calls
}

// outcomes counts the results of concurrent Process calls.
type outcomes struct {
	processed, duplicates int
	errs                  []error
}

// processConcurrently calls Process n times at once with the same key and
// sends the outcomes when all calls have returned.
func processConcurrently(b bundle, n int, fn func(context.Context, *sqlx.Tx) error) <-chan outcomes {
	out := make(chan outcomes, 1)
	go func() {
		var (
			mu  sync.Mutex
			wg  sync.WaitGroup
			got outcomes
		)
		for range n {
			wg.Go(func() {
				res, err := b.p.Process(context.Background(), "billing", "m1", fn)
				mu.Lock()
				defer mu.Unlock()
				switch {
				case err != nil:
					got.errs = append(got.errs, err)
				case res == dedup.Processed:
					got.processed++
				case res == dedup.Duplicate:
					got.duplicates++
				}
			})
		}
		wg.Wait()
		out <- got
	}()
	return out
}

// waitBlocked waits until n sessions are blocked by the backend pid.
func waitBlocked(t *testing.T, b bundle, pid, n int) {
	t.Helper()
	testenv.Eventually(t, 15*time.Second, func() bool {
		var waiting int
		require.NoError(t, b.db.Get(&waiting, `SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY (pg_blocking_pids(pid))`, pid))
		return waiting == n
	}, "%d deliveries waiting on the first one's transaction", n)
}

func receive[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(30 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

func TestProcess_concurrent(t *testing.T) {
	t.Parallel()
	const n = 10

	t.Run("duplicates wait for the first delivery and are skipped", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		fn, pid, release, calls := holdFirst(t, func(ctx context.Context, tx *sqlx.Tx) error {
			return writeEffect(ctx, tx, "billing", "m1")
		})
		done := processConcurrently(b, n, fn)
		// Every other delivery blocks on the first one's uncommitted insert.
		waitBlocked(t, b, receive(t, pid, "first handler call"), n-1)
		release()

		got := receive(t, done, "all deliveries")
		require.Empty(t, got.errs)
		require.Equal(t, 1, got.processed)
		require.Equal(t, n-1, got.duplicates)
		require.EqualValues(t, 1, calls.Load(), "handler calls")
		require.Equal(t, 1, b.effects(t, "billing", "m1"))
	})

	t.Run("a waiting delivery processes after the first fails", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		boom := errors.New("boom")
		var failed atomic.Bool
		fn, pid, release, calls := holdFirst(t, func(ctx context.Context, tx *sqlx.Tx) error {
			if failed.CompareAndSwap(false, true) {
				return boom
			}
			return writeEffect(ctx, tx, "billing", "m1")
		})
		done := processConcurrently(b, n, fn)
		waitBlocked(t, b, receive(t, pid, "first handler call"), n-1)
		release()

		got := receive(t, done, "all deliveries")
		require.Len(t, got.errs, 1)
		require.ErrorIs(t, got.errs[0], boom)
		require.Equal(t, 1, got.processed)
		require.Equal(t, n-2, got.duplicates)
		require.EqualValues(t, 2, calls.Load(), "handler calls")
		require.Equal(t, 1, b.effects(t, "billing", "m1"))
		require.True(t, b.recorded(t, "billing", "m1"))
	})
}

func TestResult_String(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		res  dedup.Result
		want string
	}{
		{dedup.Processed, "processed"},
		{dedup.Duplicate, "duplicate"},
		{dedup.Result(0), "Result(0)"},
	} {
		require.Equal(t, tc.want, tc.res.String())
	}
}

// Contexts cancelled at any moment of Process (before the insert, while the
// handler runs, around the commit) and handlers that fail, on a small pool,
// leave no connection
// behind, never cancel another call's statements on a reused connection (a
// cancel request racing the connection's return to the pool), and keep the
// record and the handler's effects together: afterwards every message is
// processed exactly once, by the first pass or by a second one.
func TestProcessUnderCancelledContexts(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.db.SetMaxOpenConns(2)
	const n = 200
	var (
		wg        sync.WaitGroup
		processed atomic.Int32
		collat    atomic.Int32
	)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += 8 {
				msgID := "m" + strconv.Itoa(i)
				handler := func(ctx context.Context, tx *sqlx.Tx) error {
					if err := writeEffect(ctx, tx, "c", msgID); err != nil {
						return err
					}
					if _, err := tx.ExecContext(ctx, `SELECT pg_sleep($1)`, float64(i%5)/1000); err != nil {
						return err
					}
					if i%10 == 1 {
						return errors.New("handler failed")
					}
					return nil
				}
				if i%3 == 0 && i%10 != 1 {
					// A call nobody cancels must always succeed.
					if _, err := b.p.Process(context.Background(), "c", msgID, handler); err != nil {
						collat.Add(1)
						t.Errorf("uncancelled Process of %s: %v", msgID, err)
					}
					processed.Add(1)
					continue
				}
				ctx, cancel := context.WithTimeout(context.Background(), time.Duration(i%7)*time.Millisecond)
				res, err := b.p.Process(ctx, "c", msgID, handler)
				cancel()
				if err == nil && res == dedup.Processed {
					processed.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	require.Zero(t, collat.Load(), "calls failed although their context was never cancelled")
	require.Equal(t, 0, b.db.Int(t, `SELECT count(*) FROM processed_message p
		WHERE NOT EXISTS (SELECT 1 FROM effects e WHERE e.message_id = p.message_id)`), "recorded without effect")
	require.Equal(t, 0, b.db.Int(t, `SELECT count(*) FROM effects e
		WHERE NOT EXISTS (SELECT 1 FROM processed_message p WHERE p.message_id = e.message_id)`), "effect without record")
	require.GreaterOrEqual(t, b.db.Int(t, `SELECT count(*) FROM processed_message`), int(processed.Load()))

	// The pool is intact: a second pass processes what the first did not.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i := range n {
		msgID := "m" + strconv.Itoa(i)
		_, err := b.p.Process(ctx, "c", msgID, func(ctx context.Context, tx *sqlx.Tx) error {
			return writeEffect(ctx, tx, "c", msgID)
		})
		require.NoError(t, err, "second pass, %s", msgID)
	}
	require.Equal(t, n, b.db.Int(t, `SELECT count(*) FROM effects`), "effects of %d messages", n)
	require.Equal(t, n, b.db.Int(t, `SELECT count(DISTINCT message_id) FROM effects`), "every message handled once")
	require.Zero(t, b.db.Stats().InUse, "connections still in use after every call returned")
}
