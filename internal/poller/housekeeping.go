package poller

import (
	"cmp"
	"context"
	"database/sql"
	"fmt"
	"log/slog"
	"time"

	"github.com/robfig/cron/v3"

	"github.com/pgnats/outbox/schema"
)

// Housekeeping configures the publisher's scheduled chores. Schedules use
// robfig/cron syntax ("@every 1m", "0 3 * * *"); an empty schedule turns a
// chore off.
type Housekeeping struct {
	DB     *sql.DB
	Table  string // events table
	Logger *slog.Logger

	// BacklogSchedule logs the READY backlog, its oldest age, the FAILED
	// count and the blocked entities, for operators who grep logs.
	BacklogSchedule string
	// RetentionSchedule deletes SUCCESS events published more than
	// Retention ago, in batches of deleteBatch rows. Off by default: the
	// events table is also each entity's history.
	RetentionSchedule string
	Retention         time.Duration

	// ProcessedRetention, when positive, also deletes on RetentionSchedule
	// the rows of ProcessedTable (pkg/dedup's processed-message table,
	// default "processed_message") processed more than ProcessedRetention
	// ago, in batches of deleteBatch rows. Keep it at least as long as the
	// max_age of the streams consumers read (see CheckProcessedRetention):
	// a message redelivered after its row is gone would be handled again.
	ProcessedRetention time.Duration
	ProcessedTable     string

	// MetricsSchedule refreshes the backlog gauges of Metrics (READY,
	// retrying and FAILED counts, the oldest READY age, blocked entities),
	// once at start and then on this schedule, so a scrape never runs a
	// query. Both must be set for the chore to run.
	MetricsSchedule string
	Metrics         *Metrics
}

// deleteBatch bounds each retention DELETE, so it never holds many row
// locks or a long transaction next to the publish loop.
const deleteBatch = 1000

// StartHousekeeping schedules the chores h turns on and returns a function
// that stops them and waits for a running one to finish.
func StartHousekeeping(ctx context.Context, h Housekeeping) (stop func(), err error) {
	name, err := schema.ParseName(h.Table)
	if err != nil {
		return nil, err
	}
	processed, err := schema.ParseName(cmp.Or(h.ProcessedTable, schema.DefaultProcessed))
	if err != nil {
		return nil, err
	}
	if h.RetentionSchedule != "" && h.Retention <= 0 && h.ProcessedRetention <= 0 {
		return nil, fmt.Errorf("housekeeping: a retention schedule needs a positive retention")
	}
	if h.Logger == nil {
		h.Logger = slog.New(slog.DiscardHandler)
	}
	// A chore slower than its schedule skips a turn rather than running
	// twice at once: two retention runs would select the same rows and
	// wait on each other's locks, and refreshes would pile up queries.
	c := cron.New(cron.WithLocation(time.UTC), cron.WithChain(cron.SkipIfStillRunning(cron.DiscardLogger)))
	if h.BacklogSchedule != "" {
		if _, err := c.AddFunc(h.BacklogSchedule, func() { h.logBacklog(ctx) }); err != nil {
			return nil, fmt.Errorf("backlog schedule %q: %w", h.BacklogSchedule, err)
		}
	}
	if h.MetricsSchedule != "" && h.Metrics != nil {
		if _, err := c.AddFunc(h.MetricsSchedule, func() { h.refreshMetrics(ctx, name.Quoted()) }); err != nil {
			return nil, fmt.Errorf("metrics schedule %q: %w", h.MetricsSchedule, err)
		}
	}
	if h.RetentionSchedule != "" && h.Retention > 0 {
		del := `DELETE FROM ` + name.Quoted() + ` WHERE event_id IN (
			SELECT event_id FROM ` + name.Quoted() + `
			WHERE event_status = 'SUCCESS' AND published_at < now() - $1 * interval '1 millisecond'
			ORDER BY seq LIMIT ` + fmt.Sprint(deleteBatch) + `)`
		if _, err := c.AddFunc(h.RetentionSchedule, func() {
			h.deleteOld(ctx, del, h.Retention, "published events")
		}); err != nil {
			return nil, fmt.Errorf("retention schedule %q: %w", h.RetentionSchedule, err)
		}
	}
	if h.RetentionSchedule != "" && h.ProcessedRetention > 0 {
		// The processed_at index serves the inner select.
		del := `DELETE FROM ` + processed.Quoted() + ` WHERE (consumer_id, message_id) IN (
			SELECT consumer_id, message_id FROM ` + processed.Quoted() + `
			WHERE processed_at < now() - $1 * interval '1 millisecond'
			ORDER BY processed_at LIMIT ` + fmt.Sprint(deleteBatch) + `)`
		if _, err := c.AddFunc(h.RetentionSchedule, func() {
			h.deleteOld(ctx, del, h.ProcessedRetention, "processed messages")
		}); err != nil {
			return nil, fmt.Errorf("retention schedule %q: %w", h.RetentionSchedule, err)
		}
	}
	if h.MetricsSchedule != "" && h.Metrics != nil {
		h.refreshMetrics(ctx, name.Quoted()) // gauges are right from the first scrape
	}
	c.Start()
	return func() { <-c.Stop().Done() }, nil
}

func (h Housekeeping) logBacklog(ctx context.Context) {
	st, err := ReadStatus(ctx, h.DB, h.Table, 1)
	if err != nil {
		h.Logger.Warn("read backlog", "err", err)
		return
	}
	age := time.Duration(0)
	if st.OldestReadyAge != nil {
		age = st.OldestReadyAge.Round(time.Millisecond)
	}
	h.Logger.Info("backlog", "ready", st.Counts["READY"], "retrying", st.Retrying, "oldest_ready_age", age,
		"failed", st.Counts["FAILED"], "blocked_entities", st.BlockedTotal)
}

// refreshMetrics sets the backlog gauges; on an error they keep their
// last values, and outbox_backlog_refresh_timestamp_seconds shows how old
// they are.
func (h Housekeeping) refreshMetrics(ctx context.Context, table string) {
	qctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	b, err := readBacklog(qctx, h.DB, table)
	if err != nil {
		if ctx.Err() == nil { // not stopping
			h.Logger.Warn("refresh backlog metrics", "err", err)
		}
		return
	}
	h.Metrics.setBacklog(b)
}

// deleteOld runs del, which deletes at most deleteBatch rows older than
// retention, until it deletes fewer.
func (h Housekeeping) deleteOld(ctx context.Context, del string, retention time.Duration, what string) {
	var total int64
	for ctx.Err() == nil {
		res, err := h.DB.ExecContext(ctx, del, retention.Milliseconds())
		if err != nil {
			h.Logger.Warn("delete rows past retention", "rows", what, "err", err, "deleted", total)
			return
		}
		n, _ := res.RowsAffected()
		total += n
		if n < deleteBatch {
			break
		}
	}
	if total > 0 {
		h.Logger.Info("deleted rows past retention", "rows", what, "deleted", total, "retention", retention)
	}
}
