package poller

import (
	"errors"
	"fmt"

	"github.com/lib/pq"
)

// A database error of SQLSTATE class 42 (syntax error or access rule
// violation: a privilege the role lacks, a column or table that is gone)
// fails every try the same way until an operator acts, yet the loop backs
// off from it like from an outage, with the database answering pings. The
// loop counts such errors in a row and, from faultAfter on, reports the
// last one through Fault, which /readyz shows.
const faultAfter = 3

// Fault is a database error the publish loop keeps failing on and that
// retrying cannot fix.
type Fault struct {
	// Code is the SQLSTATE, such as "42501" (insufficient_privilege).
	Code string
	// Hint says what an operator should do about it.
	Hint string
	// Attempts is how many tries in a row failed with such an error.
	Attempts int
	// Err is the last of those errors.
	Err error
}

func (f *Fault) Error() string {
	return fmt.Sprintf("%d attempts in a row failed with SQLSTATE %s: %v (%s)", f.Attempts, f.Code, f.Err, f.Hint)
}

func (f *Fault) Unwrap() error { return f.Err }

// lasting returns the SQLSTATE of err and a hint for an operator when err
// is a database error that retrying cannot fix, or "" when it is not (an
// unreachable database, a failover, a timeout, a serialization failure...).
func lasting(err error) (code, hint string) {
	var pe *pq.Error
	if !errors.As(err, &pe) || pe.Code.Class() != "42" {
		return "", ""
	}
	switch pe.Code {
	case "42501": // insufficient_privilege
		return string(pe.Code), "grant the publisher's database role what it needs: USAGE on the schema, SELECT and UPDATE on the events table " +
			"(with --partitions, SELECT, INSERT, UPDATE and DELETE on the lease tables); see docs/OPERATIONS.md, Least privilege"
	case "42703", "42P01": // undefined_column, undefined_table
		return string(pe.Code), "a column or table the publisher uses is missing: restore it, or run 'publisher migrate' if the schema is behind this version"
	}
	return string(pe.Code), "a statement of the publisher is refused by the database schema or its privileges: check both against this publisher's version"
}

// faultAttrs returns the log attributes naming err's SQLSTATE and a hint
// when err is a lasting database error, or none.
func faultAttrs(err error) []any {
	if code, hint := lasting(err); code != "" {
		return []any{"sqlstate", code, "hint", hint}
	}
	return nil
}

// noteFault records the outcome of one try of the loop (err nil: a batch
// went through, or nothing was due, or this process stands by) and logs once when lasting database errors reach faultAfter in
// a row. Only the loop calls it; Fault may be called from any goroutine.
func (p *Poller) noteFault(err error) {
	code, hint := lasting(err)
	if code == "" {
		p.faults = 0
		p.fault.Store(nil)
		return
	}
	p.faults++
	if p.faults < faultAfter {
		return
	}
	f := &Fault{Code: code, Hint: hint, Attempts: p.faults, Err: err}
	if p.fault.Swap(f) == nil {
		p.log.Error("publish loop keeps failing on a database error that retrying cannot fix",
			"err", err, "sqlstate", code, "attempts", p.faults, "hint", hint)
	}
}

// Fault returns, while the loop's last tries (at least 3 in a row) failed
// with a database error that retrying cannot fix (SQLSTATE class 42: a
// missing privilege, column or table), a *Fault describing the last one;
// nil otherwise, including while the loop is idle or backing off from an
// outage. Safe to call from any goroutine.
func (p *Poller) Fault() *Fault { return p.fault.Load() }
