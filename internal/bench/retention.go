package bench

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/pgnats/outbox/internal/poller"
)

// benchRetention is the retention the bench applies: the old SUCCESS rows
// (published two days ago) are past it, the backlog's never are.
const benchRetention = 24 * time.Hour

// retentionSchedule runs the chore every second, so that it starts soon
// and starts again after a run ends.
const retentionSchedule = "@every 1s"

// retentionResult is what the retention chore deleted while it ran, and
// its rate from the start of its first DELETE to the end of its last.
type retentionResult struct {
	deleted int64
	perSec  float64
}

// retentionRun is the publisher's retention chore (poller.StartHousekeeping,
// as `publisher run --retention` starts it) running beside a drain, on a
// pool of its own whose deletes are counted and timed.
type retentionRun struct {
	cancel   context.CancelFunc
	stopHK   func()
	deletes  *stmtTimer
	closeDB  func() error
	once     sync.Once
	finished retentionResult
}

// startRetention starts the retention chore on the scratch table and waits
// until its first DELETE has run.
func (e *env) startRetention(ctx context.Context) (*retentionRun, error) {
	deletes := &stmtTimer{match: isDelete}
	db, err := deletes.open(e.dsn)
	if err != nil {
		return nil, err
	}
	hctx, cancel := context.WithCancel(ctx)
	stop, err := poller.StartHousekeeping(hctx, poller.Housekeeping{DB: db, Table: "events",
		RetentionSchedule: retentionSchedule, Retention: benchRetention})
	if err != nil {
		cancel()
		db.Close()
		return nil, fmt.Errorf("start retention: %w", err)
	}
	r := &retentionRun{cancel: cancel, stopHK: stop, deletes: deletes, closeDB: db.Close}
	if err := waitFor(ctx, 10*time.Second, func() (bool, error) {
		n, _ := deletes.total()
		return n > 0, nil
	}); err != nil {
		r.stop()
		return nil, fmt.Errorf("waiting for the retention chore to delete: %w", err)
	}
	return r, nil
}

// stop ends the chore, waits for it, and returns what it deleted. A DELETE
// the stop cancels deletes nothing and is not counted.
func (r *retentionRun) stop() retentionResult {
	r.once.Do(func() {
		r.cancel()
		r.stopHK()
		r.closeDB() //nolint:errcheck
		deleted, span := r.deletes.total()
		r.finished.deleted = deleted
		if deleted > 0 && span > 0 {
			r.finished.perSec = float64(deleted) / span.Seconds()
		}
	})
	return r.finished
}
