package bench

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/lib/pq"
)

// ClaimLatency is how long the publisher's claim statements took, in
// milliseconds: from sending the statement until its last row was read,
// as the loop waits for it. Only claims that returned rows count.
// Samples 0: no claim was timed.
type ClaimLatency struct {
	Samples int     `json:"samples"`
	P50     float64 `json:"p50"`
	P99     float64 `json:"p99"`
	Max     float64 `json:"max"`
}

// stmtTimer records the statements of one kind that a pool runs, without
// touching the code that runs them: the pool's connections are lib/pq's,
// wrapped so that each statement match selects is timed from its
// execution until its rows are closed (a query) or it returns (an exec),
// with the rows it returned or affected. The wrapper forwards every
// interface lib/pq's connection implements, so the client's round trips
// stay as they are (its multi-statement simple queries included).
type stmtTimer struct {
	match   func(query string) bool
	mu      sync.Mutex
	samples []stmtSample
}

type stmtSample struct {
	start, end time.Time
	rows       int64
}

// isClaim tells the publisher's claim from its other statements: it alone
// locks rows with SKIP LOCKED.
func isClaim(query string) bool { return strings.Contains(query, "SKIP LOCKED") }

// isDelete tells the retention chore's deletes.
func isDelete(query string) bool { return strings.HasPrefix(strings.TrimSpace(query), "DELETE") }

// open returns a pool on dsn whose statements t times.
func (t *stmtTimer) open(dsn string) (*sql.DB, error) {
	base, err := pq.NewConnector(dsn)
	if err != nil {
		return nil, err
	}
	db := sql.OpenDB(timedConnector{base: base, t: t})
	db.SetMaxOpenConns(32)
	db.SetMaxIdleConns(32)
	return db, nil
}

func (t *stmtTimer) record(start time.Time, rows int64) {
	end := time.Now()
	t.mu.Lock()
	t.samples = append(t.samples, stmtSample{start: start, end: end, rows: rows})
	t.mu.Unlock()
}

// latency summarises the statements that returned rows and ended in
// [from, to].
func (t *stmtTimer) latency(from, to time.Time) ClaimLatency {
	return t.summary(func(s stmtSample, _ int64) bool { return !s.end.Before(from) && !s.end.After(to) })
}

// latencyOfRows summarises the statements that returned rows number from
// to to-1, counting the rows of all in the order they ended: for claims,
// those that claimed a given stretch of the backlog.
func (t *stmtTimer) latencyOfRows(from, to int64) ClaimLatency {
	return t.summary(func(s stmtSample, before int64) bool { return before < to && before+s.rows > from })
}

// summary summarises the statements that returned rows and that keep
// selects, given the rows returned by those that ended before.
func (t *stmtTimer) summary(keep func(s stmtSample, before int64) bool) ClaimLatency {
	t.mu.Lock()
	samples := slices.Clone(t.samples)
	t.mu.Unlock()
	slices.SortFunc(samples, func(a, b stmtSample) int { return a.end.Compare(b.end) })
	var (
		ms     []float64
		before int64
	)
	for _, s := range samples {
		if s.rows == 0 {
			continue
		}
		if keep(s, before) {
			ms = append(ms, float64(s.end.Sub(s.start))/float64(time.Millisecond))
		}
		before += s.rows
	}
	if len(ms) == 0 {
		return ClaimLatency{}
	}
	slices.Sort(ms)
	q := func(f float64) float64 { return ms[min(len(ms)-1, int(f*float64(len(ms))))] }
	return ClaimLatency{Samples: len(ms), P50: q(0.50), P99: q(0.99), Max: ms[len(ms)-1]}
}

// firstStart returns when the first statement recorded started, or zero.
func (t *stmtTimer) firstStart() time.Time {
	t.mu.Lock()
	defer t.mu.Unlock()
	var first time.Time
	for _, s := range t.samples {
		if first.IsZero() || s.start.Before(first) {
			first = s.start
		}
	}
	return first
}

// total returns the rows of the statements recorded, and the span from
// the start of the first to the end of the last that returned or affected
// rows.
func (t *stmtTimer) total() (rows int64, span time.Duration) {
	t.mu.Lock()
	defer t.mu.Unlock()
	var first, last time.Time
	for _, s := range t.samples {
		if s.rows == 0 {
			continue
		}
		rows += s.rows
		if first.IsZero() || s.start.Before(first) {
			first = s.start
		}
		if s.end.After(last) {
			last = s.end
		}
	}
	return rows, last.Sub(first)
}

type timedConnector struct {
	base driver.Connector
	t    *stmtTimer
}

func (c timedConnector) Connect(ctx context.Context) (driver.Conn, error) {
	cn, err := c.base.Connect(ctx)
	if err != nil {
		return nil, err
	}
	return &timedConn{Conn: cn, t: c.t}, nil
}

func (c timedConnector) Driver() driver.Driver { return c.base.Driver() }

// timedConn is a lib/pq connection whose matching statements are timed.
type timedConn struct {
	driver.Conn
	t *stmtTimer
}

func (c *timedConn) PrepareContext(ctx context.Context, query string) (driver.Stmt, error) {
	var (
		st  driver.Stmt
		err error
	)
	if p, ok := c.Conn.(driver.ConnPrepareContext); ok {
		st, err = p.PrepareContext(ctx, query)
	} else {
		st, err = c.Conn.Prepare(query)
	}
	if err != nil || !c.t.match(query) {
		return st, err
	}
	return &timedStmt{Stmt: st, t: c.t}, nil
}

func (c *timedConn) BeginTx(ctx context.Context, opts driver.TxOptions) (driver.Tx, error) {
	if b, ok := c.Conn.(driver.ConnBeginTx); ok {
		return b.BeginTx(ctx, opts)
	}
	return nil, errors.New("bench: the driver cannot begin a transaction with options")
}

func (c *timedConn) ExecContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Result, error) {
	x, ok := c.Conn.(driver.ExecerContext)
	if !ok {
		return nil, driver.ErrSkip
	}
	start := time.Now()
	res, err := x.ExecContext(ctx, query, args)
	if err == nil && c.t.match(query) {
		c.t.recordResult(start, res)
	}
	return res, err
}

func (c *timedConn) QueryContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Rows, error) {
	q, ok := c.Conn.(driver.QueryerContext)
	if !ok {
		return nil, driver.ErrSkip
	}
	start := time.Now()
	rows, err := q.QueryContext(ctx, query, args)
	if err != nil || !c.t.match(query) {
		return rows, err
	}
	return &timedRows{Rows: rows, t: c.t, start: start}, nil
}

func (c *timedConn) CheckNamedValue(nv *driver.NamedValue) error {
	if v, ok := c.Conn.(driver.NamedValueChecker); ok {
		return v.CheckNamedValue(nv)
	}
	return driver.ErrSkip
}

func (c *timedConn) Ping(ctx context.Context) error {
	if p, ok := c.Conn.(driver.Pinger); ok {
		return p.Ping(ctx)
	}
	return nil
}

func (c *timedConn) ResetSession(ctx context.Context) error {
	if r, ok := c.Conn.(driver.SessionResetter); ok {
		return r.ResetSession(ctx)
	}
	return nil
}

func (c *timedConn) IsValid() bool {
	if v, ok := c.Conn.(driver.Validator); ok {
		return v.IsValid()
	}
	return true
}

// timedStmt is a prepared statement that matched.
type timedStmt struct {
	driver.Stmt
	t *stmtTimer
}

func (s *timedStmt) QueryContext(ctx context.Context, args []driver.NamedValue) (driver.Rows, error) {
	start := time.Now()
	rows, err := s.Stmt.(driver.StmtQueryContext).QueryContext(ctx, args)
	if err != nil {
		return nil, err
	}
	return &timedRows{Rows: rows, t: s.t, start: start}, nil
}

func (s *timedStmt) ExecContext(ctx context.Context, args []driver.NamedValue) (driver.Result, error) {
	start := time.Now()
	res, err := s.Stmt.(driver.StmtExecContext).ExecContext(ctx, args)
	if err == nil {
		s.t.recordResult(start, res)
	}
	return res, err
}

// recordResult records an exec that started at start, with the rows it
// affected.
func (t *stmtTimer) recordResult(start time.Time, res driver.Result) {
	n, err := res.RowsAffected()
	if err != nil {
		n = 0
	}
	t.record(start, n)
}

// timedRows records its statement when closed, with the rows it returned.
type timedRows struct {
	driver.Rows
	t     *stmtTimer
	start time.Time
	n     int64
}

func (r *timedRows) Next(dest []driver.Value) error {
	err := r.Rows.Next(dest)
	if err == nil {
		r.n++
	}
	return err
}

func (r *timedRows) Close() error {
	r.t.record(r.start, r.n)
	return r.Rows.Close()
}
