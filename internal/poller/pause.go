package poller

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/lib/pq"

	"github.com/pgnats/outbox/schema"
)

// PauseState is the pause switch of an events table (its _control table,
// migration 0004). While Paused, no publisher of the table claims events.
type PauseState struct {
	Paused bool
	// At and By tell when and by whom the switch was last set (paused or
	// resumed); zero when it never was.
	At time.Time
	By string
}

// pauseCheckEvery is how often the publish loop reads the pause switch:
// a pause or resume takes effect within about this long.
const pauseCheckEvery = time.Second

// ReadPause returns the pause switch of table. A table at a schema version
// before the switch (no _control table) is not paused.
func ReadPause(ctx context.Context, db *sql.DB, table string) (PauseState, error) {
	n, err := schema.ParseName(cmp.Or(table, schema.DefaultEvents))
	if err != nil {
		return PauseState{}, err
	}
	return readPause(ctx, db, n)
}

func readPause(ctx context.Context, db *sql.DB, table schema.Name) (PauseState, error) {
	var (
		st PauseState
		at sql.NullTime
		by sql.NullString
	)
	err := db.QueryRowContext(ctx, `SELECT paused, paused_at, paused_by FROM `+table.Control().Quoted()).Scan(&st.Paused, &at, &by)
	var pqErr *pq.Error
	switch {
	case errors.Is(err, sql.ErrNoRows), errors.As(err, &pqErr) && pqErr.Code == "42P01": // undefined_table
		return PauseState{}, nil
	case err != nil:
		return PauseState{}, fmt.Errorf("read pause switch: %w", err)
	}
	st.At, st.By = at.Time, by.String
	return st, nil
}

// SetPause pauses (paused true) or resumes every publisher of table,
// recording by (who) and the time. Publishers notice within about a
// second; a pause lets each finish the batch it has in flight. It fails
// when the table is at a schema version before the switch: run
// 'publisher migrate' first.
func SetPause(ctx context.Context, db *sql.DB, table string, paused bool, by string) error {
	n, err := schema.ParseName(cmp.Or(table, schema.DefaultEvents))
	if err != nil {
		return err
	}
	_, err = db.ExecContext(ctx, `INSERT INTO `+n.Control().Quoted()+` (id, paused, paused_at, paused_by)
		VALUES (true, $1, now(), $2)
		ON CONFLICT (id) DO UPDATE SET paused = EXCLUDED.paused, paused_at = EXCLUDED.paused_at, paused_by = EXCLUDED.paused_by`,
		paused, by)
	var pqErr *pq.Error
	switch {
	case errors.As(err, &pqErr) && pqErr.Code == "42P01":
		return fmt.Errorf("set pause switch: table %s does not exist: run 'publisher migrate' first", n.Control())
	case err != nil:
		return fmt.Errorf("set pause switch: %w", err)
	}
	return nil
}

// checkPause reads the pause switch when the last read is older than
// pauseCheckEvery and reports whether publishing is paused. A read that
// fails keeps the last known state (not paused before a first read),
// logged once until a read succeeds again. Pausing and resuming are logged once.
func (p *Poller) checkPause(ctx context.Context) bool {
	last := p.pause.Load()
	if last != nil && time.Since(p.pauseRead) < pauseCheckEvery {
		return last.Paused
	}
	p.pauseRead = time.Now()
	rctx, cancel := context.WithTimeout(ctx, pauseCheckEvery)
	st, err := readPause(rctx, p.db, p.table)
	cancel()
	if err != nil {
		if ctx.Err() == nil && !p.pauseErr {
			// Once per streak of failures: a role without SELECT on the
			// control table would otherwise log every second.
			p.pauseErr = true
			p.log.Warn("reading the pause switch failed; keeping the last state until it can be read",
				"err", err, "table", p.table.Control().String(),
				"hint", "grant SELECT on it to the publisher's role, or run 'publisher migrate' if it is missing")
		}
		return last != nil && last.Paused
	}
	if p.pauseErr {
		p.pauseErr = false
		p.log.Info("pause switch readable again")
	}
	p.pause.Store(&st)
	was := last != nil && last.Paused
	switch {
	case st.Paused && !was:
		p.log.Info("publishing paused", "by", st.By, "at", st.At)
	case !st.Paused && was:
		p.log.Info("publishing resumed", "by", st.By, "at", st.At)
	}
	p.cfg.Metrics.paused(st.Paused)
	return st.Paused
}

// Pause returns the pause switch as this publisher last read it (at most
// about a second old while it runs). Safe to call from any goroutine.
func (p *Poller) Pause() PauseState {
	if st := p.pause.Load(); st != nil {
		return *st
	}
	return PauseState{}
}
