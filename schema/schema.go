// Package schema holds the outbox's SQL: the events table, its indexes and
// NOTIFY trigger, the processed_message table used by pkg/dedup, and the
// function that applies them.
//
// The SQL lives in numbered files (NNNN_name.up.sql / .down.sql) embedded in
// the binary. Table names are configurable; each one is validated and quoted
// before it is put into a statement, so no raw input reaches the SQL text.
package schema

import (
	"bytes"
	"cmp"
	"context"
	"database/sql"
	"database/sql/driver"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"text/template"
	"time"

	"github.com/lib/pq"
)

//go:embed *.sql
var files embed.FS

// Default table names.
const (
	DefaultEvents    = "events"
	DefaultProcessed = "processed_message"
)

// ErrInvalidName is returned (wrapped) for a table name that is not a plain
// or schema-qualified SQL identifier.
var ErrInvalidName = errors.New("invalid table name")

// SleepLockNamespace is the first key of the advisory lock a publisher
// holds, with the events table's oid as the second, while it sleeps waiting
// for NOTIFY. The insert trigger notifies only while that lock is held.
const SleepLockNamespace = 0x6f627833 // "obx3"

// maxIdent is PostgreSQL's identifier length limit (NAMEDATALEN-1).
const maxIdent = 63

// longestSuffix is the longest suffix appended to the events table's name to
// name its indexes, trigger and function; the table name must leave room.
const longestSuffix = len("_processed_at_idx")

var identRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// Tables names the tables the outbox uses. The zero value means the
// defaults: "events", "processed_message" and "<events>_migrations".
// A name may be schema-qualified ("billing.events").
type Tables struct {
	Events     string
	Processed  string
	Migrations string
}

// WithDefaults returns t with every empty name replaced by its default.
func (t Tables) WithDefaults() Tables {
	t.Events = cmp.Or(t.Events, DefaultEvents)
	t.Processed = cmp.Or(t.Processed, DefaultProcessed)
	t.Migrations = cmp.Or(t.Migrations, t.Events+"_migrations")
	return t
}

// Validate reports the first name (after defaults) that is not a valid
// identifier, wrapping ErrInvalidName.
func (t Tables) Validate() error {
	t = t.WithDefaults()
	for _, n := range []string{t.Events, t.Processed, t.Migrations} {
		if _, err := ParseName(n); err != nil {
			return err
		}
	}
	if ev, _ := ParseName(t.Events); len(ev.Table)+longestSuffix > maxIdent {
		return fmt.Errorf("%w: %q: events table name must be at most %d characters", ErrInvalidName, t.Events, maxIdent-longestSuffix)
	}
	return nil
}

// Name is a validated table name, optionally qualified by a schema.
type Name struct {
	Schema string // empty when unqualified
	Table  string
}

// ParseName validates s ("table" or "schema.table") and splits it.
func ParseName(s string) (Name, error) {
	n := Name{Table: s}
	if i := strings.IndexByte(s, '.'); i >= 0 {
		n = Name{Schema: s[:i], Table: s[i+1:]}
	}
	if !validIdent(n.Table) || (n.Schema != "" || strings.Contains(s, ".")) && !validIdent(n.Schema) {
		return Name{}, fmt.Errorf("%w: %q: use letters, digits and underscores, starting with a letter or underscore, at most %d characters, optionally prefixed by a schema and a dot", ErrInvalidName, s, maxIdent)
	}
	return n, nil
}

func validIdent(s string) bool {
	return len(s) <= maxIdent && identRE.MatchString(s)
}

// Quoted returns the name quoted for use in SQL.
func (n Name) Quoted() string {
	if n.Schema == "" {
		return pq.QuoteIdentifier(n.Table)
	}
	return pq.QuoteIdentifier(n.Schema) + "." + pq.QuoteIdentifier(n.Table)
}

// String returns the name as written, unquoted.
func (n Name) String() string {
	if n.Schema == "" {
		return n.Table
	}
	return n.Schema + "." + n.Table
}

// sibling returns a name in the same schema as n with a suffix added.
func (n Name) sibling(suffix string) Name {
	return Name{Schema: n.Schema, Table: n.Table + suffix}
}

// Leases and Replicas name the partition-lease tables of the events table
// n (migration 0002), in n's schema.
func (n Name) Leases() Name   { return n.sibling("_leases") }
func (n Name) Replicas() Name { return n.sibling("_replicas") }

// Control names the one-row table holding the pause switch of the events
// table n (migration 0004), in n's schema.
func (n Name) Control() Name { return n.sibling("_control") }

// Channel returns the LISTEN/NOTIFY channel of the events table whose oid
// is tableOID: the insert trigger notifies "outbox_<oid>", so tables of the
// same name in different schemas never wake each other's publishers.
func Channel(tableOID int64) string { return "outbox_" + strconv.FormatInt(tableOID, 10) }

// BatchRows is how many rows one batch of a batched migration step changes,
// in its own short transaction.
const BatchRows = 5000

// Migration is one numbered step of the schema, rendered for a set of
// table names.
type Migration struct {
	Version int
	Name    string
	// Up is the whole up script, Steps the same split into transactions.
	Up    string
	Steps []Step
	Down  string
}

// Step is one transaction of an up migration. Most migrations are one step.
// A migration that must not hold a lock on a big table for long splits its
// file into steps with lines starting "-- outbox:step" (a plain step) or
// "-- outbox:batched" (a batched step).
//
// A batched step is a query taking one bigint parameter and returning one
// bigint: Migrate runs it with 0, then again, each time in its own
// transaction, with the value it returned last, until it returns NULL. It
// is how a table is converted in bounded batches (the value is the last
// key done).
type Step struct {
	SQL     string
	Batched bool
}

// stepMarker starts a line that begins a new step.
const stepMarker = "-- outbox:"

// splitSteps cuts an up script into its steps.
func splitSteps(path, up string) ([]Step, error) {
	steps := []Step{{}}
	for line := range strings.Lines(up) {
		if !strings.HasPrefix(line, stepMarker) {
			steps[len(steps)-1].SQL += line
			continue
		}
		switch kind := strings.TrimSpace(strings.TrimPrefix(line, stepMarker)); kind {
		case "step", "batched":
			steps = append(steps, Step{Batched: kind == "batched"})
		default:
			return nil, fmt.Errorf("%s: unknown step kind %q", path, kind)
		}
	}
	if steps[len(steps)-1].Batched {
		return nil, fmt.Errorf("%s: the last step must not be batched: it records the version", path)
	}
	return steps, nil
}

// Migrations returns every migration in version order, rendered for t.
func Migrations(t Tables) ([]Migration, error) {
	if err := t.Validate(); err != nil {
		return nil, err
	}
	vars := templateVars(t.WithDefaults())
	paths, err := fs.Glob(files, "*.up.sql")
	if err != nil {
		return nil, err
	}
	sort.Strings(paths)
	var out []Migration
	for _, p := range paths {
		base := strings.TrimSuffix(p, ".up.sql")
		num, name, ok := strings.Cut(base, "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil {
			return nil, fmt.Errorf("migration file %q: name must be NNNN_name.up.sql", p)
		}
		up, err := render(p, vars)
		if err != nil {
			return nil, err
		}
		down, err := render(base+".down.sql", vars)
		if err != nil {
			return nil, err
		}
		steps, err := splitSteps(p, up)
		if err != nil {
			return nil, err
		}
		out = append(out, Migration{Version: v, Name: name, Up: up, Steps: steps, Down: down})
	}
	return out, nil
}

func templateVars(t Tables) map[string]string {
	ev, _ := ParseName(t.Events)
	pr, _ := ParseName(t.Processed)
	return map[string]string{
		"Events":           ev.Quoted(),
		"Processed":        pr.Quoted(),
		"Leases":           ev.Leases().Quoted(),
		"Replicas":         ev.Replicas().Quoted(),
		"Control":          ev.Control().Quoted(),
		"SeqIndex":         pq.QuoteIdentifier(ev.Table + "_seq_idx"),
		"ReadyIndex":       pq.QuoteIdentifier(ev.Table + "_ready_idx"),
		"BlockedIndex":     pq.QuoteIdentifier(ev.Table + "_blocked_idx"),
		"EntityIndex":      pq.QuoteIdentifier(ev.Table + "_entity_idx"),
		"NotifyTrigger":    pq.QuoteIdentifier(ev.Table + "_notify"),
		"NotifyFunc":       ev.sibling("_notify").Quoted(),
		"SleepNamespace":   strconv.Itoa(SleepLockNamespace),
		"ProcessedAtIndex": pq.QuoteIdentifier(pr.Table + "_processed_at_idx"),
		"DataCopyTrigger":  pq.QuoteIdentifier(ev.Table + "_data_copy"),
		"DataCopyFunc":     ev.sibling("_data_copy").Quoted(),
		"DataBackfillFunc": ev.sibling("_data_backfill").Quoted(),
		"DataCheck":        pq.QuoteIdentifier(ev.Table + "_data_not_null"),
		"BatchSize":        strconv.Itoa(BatchRows),
	}
}

func render(path string, vars map[string]string) (string, error) {
	raw, err := files.ReadFile(path)
	if err != nil {
		return "", err
	}
	tmpl, err := template.New(path).Option("missingkey=error").Parse(string(raw))
	if err != nil {
		return "", fmt.Errorf("parse %s: %w", path, err)
	}
	var b bytes.Buffer
	if err := tmpl.Execute(&b, vars); err != nil {
		return "", fmt.Errorf("render %s: %w", path, err)
	}
	return b.String(), nil
}

// migrateLockKey serialises concurrent Migrate calls on one database.
const migrateLockKey = 0x6f7574626f78 // "outbox"

// Migrate applies every migration not yet recorded in the migrations
// table, in version order, and returns the versions it applied (none when
// the schema is current). It is MigrateTo with no target.
func Migrate(ctx context.Context, db *sql.DB, t Tables) ([]int, error) {
	return MigrateTo(ctx, db, t, 0)
}

// MigrateTo applies the migrations not yet recorded, up to and including
// version target (0 means all), and returns the versions it applied.
//
// Each migration commits on its own, recording its version in the same
// transaction as its last step: a migration split into steps (see Step)
// runs one transaction per step and per batch, so a big table is converted
// without a long lock, and a migration interrupted halfway resumes where it
// stopped on the next call. Before changing anything it checks every
// table that already exists under a configured name (events, processed,
// leases, replicas, migrations) against the columns, types and primary key
// the applied version expects, and returns an error wrapping ErrTableShape
// that names each table and column at fault rather than adopt a table it
// did not make. Concurrent callers are serialised by an
// advisory lock held for the whole call, so running it from several
// processes at once is safe: the others wait, then find nothing to do.
func MigrateTo(ctx context.Context, db *sql.DB, t Tables, target int) ([]int, error) {
	migrations, err := Migrations(t)
	if err != nil {
		return nil, err
	}
	versions, _ := ParseName(t.WithDefaults().Migrations)

	conn, err := db.Conn(ctx)
	if err != nil {
		return nil, fmt.Errorf("connect for migration: %w", err)
	}
	defer conn.Close()
	// A statement_timeout or lock_timeout of the role, the database or the
	// connection string would cancel the wait for the migration lock and
	// the long statements of a big table (a copy batch, the validating
	// scan) on every run, so the table could never be migrated: lift both
	// for this session while it migrates (a step that takes an exclusive
	// lock sets its own lock_timeout) and restore them before the
	// connection goes back to the pool.
	if _, err := conn.ExecContext(ctx, `SELECT set_config('statement_timeout', '0', false),
		set_config('lock_timeout', '0', false)`); err != nil {
		return nil, fmt.Errorf("lift timeouts for migration: %w", err)
	}
	defer func() {
		if _, err := conn.ExecContext(context.WithoutCancel(ctx), `RESET statement_timeout; RESET lock_timeout`); err != nil {
			_ = conn.Raw(func(any) error { return driver.ErrBadConn })
		}
	}()
	if _, err := conn.ExecContext(ctx, `SELECT pg_advisory_lock($1)`, migrateLockKey); err != nil {
		return nil, fmt.Errorf("lock migrations: %w", err)
	}
	defer func() {
		_, err := conn.ExecContext(context.WithoutCancel(ctx), `SELECT pg_advisory_unlock($1)`, migrateLockKey)
		if err != nil {
			// Never hand a connection that may still hold the lock back
			// to the pool: closing it releases the lock.
			_ = conn.Raw(func(any) error { return driver.ErrBadConn })
		}
	}()

	// A migrations table of the configured name that Migrate did not make
	// would be misread: check it before reading it.
	if problems, err := checkShape(ctx, conn, tablesOf(t)[0], 0); err != nil {
		return nil, err
	} else if len(problems) > 0 {
		return nil, shapeError(problems)
	}
	if _, err := conn.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS `+versions.Quoted()+` (
		version    integer     PRIMARY KEY,
		name       text        NOT NULL,
		applied_at timestamptz NOT NULL DEFAULT now())`); err != nil {
		return nil, fmt.Errorf("create migrations table: %w", err)
	}
	applied := map[int]bool{}
	rows, err := conn.QueryContext(ctx, `SELECT version FROM `+versions.Quoted())
	if err != nil {
		return nil, fmt.Errorf("read applied migrations: %w", err)
	}
	for rows.Next() {
		var v int
		if err := rows.Scan(&v); err != nil {
			rows.Close()
			return nil, err
		}
		applied[v] = true
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	current := 0
	for v := range applied {
		current = max(current, v)
	}
	// CREATE TABLE IF NOT EXISTS would adopt any table of a configured
	// name: refuse one the outbox could not have made.
	if err := checkShapes(ctx, conn, t, current); err != nil {
		return nil, err
	}

	var done []int
	for _, m := range migrations {
		if applied[m.Version] || target > 0 && m.Version > target {
			continue
		}
		if err := apply(ctx, conn, m, versions); err != nil {
			return done, fmt.Errorf("apply migration %04d_%s: %w", m.Version, m.Name, err)
		}
		done = append(done, m.Version)
	}
	return done, nil
}

// apply runs the steps of m on conn, each in its own transaction, and
// records m's version with the last one.
func apply(ctx context.Context, conn *sql.Conn, m Migration, versions Name) error {
	for i, s := range m.Steps {
		if s.Batched {
			// Outside a transaction block each call commits on its own.
			for after := (sql.NullInt64{Valid: true}); after.Valid; {
				if err := conn.QueryRowContext(ctx, s.SQL, after.Int64).Scan(&after); err != nil {
					return fmt.Errorf("step %d, batch after %d: %w", i+1, after.Int64, err)
				}
			}
			continue
		}
		record := i == len(m.Steps)-1
		var err error
		for attempt := 1; ; attempt++ {
			err = runStep(ctx, conn, s.SQL, record, m, versions)
			if !isLockTimeout(err) || attempt == lockAttempts {
				break
			}
			// A step that gives up waiting for its lock (its lock_timeout)
			// was rolled back whole: try again, after the transaction in
			// the way has had a moment to end.
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(lockRetryPause):
			}
		}
		if err != nil {
			return fmt.Errorf("step %d: %w", i+1, err)
		}
	}
	return nil
}

// A step that sets a lock_timeout is tried lockAttempts times in all,
// lockRetryPause apart, before Migrate gives up.
const (
	lockAttempts   = 10
	lockRetryPause = time.Second
)

// runStep runs one step in a transaction, with the version record when
// record is set.
func runStep(ctx context.Context, conn *sql.Conn, query string, record bool, m Migration, versions Name) error {
	tx, err := conn.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback() //nolint:errcheck // no-op after commit
	if _, err := tx.ExecContext(ctx, query); err != nil {
		return err
	}
	if record {
		if _, err := tx.ExecContext(ctx, `INSERT INTO `+versions.Quoted()+` (version, name) VALUES ($1, $2)`, m.Version, m.Name); err != nil {
			return fmt.Errorf("record version: %w", err)
		}
	}
	return tx.Commit()
}

// isLockTimeout reports whether err is PostgreSQL's lock_not_available,
// what a statement gets when its lock_timeout expires.
func isLockTimeout(err error) bool {
	var pqErr *pq.Error
	return errors.As(err, &pqErr) && pqErr.Code == "55P03"
}

// Script returns every up migration as one SQL script, for users who apply
// migrations with their own tool. It does not create the migrations table.
// A batched step becomes a loop in a DO block, so the script is correct
// when run as a whole, but each such loop then runs in one transaction: on
// a big table, run the steps as Migrate does (see Step) instead.
func Script(t Tables) (string, error) {
	migrations, err := Migrations(t)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	for _, m := range migrations {
		fmt.Fprintf(&b, "-- %04d_%s\n", m.Version, m.Name)
		for _, s := range m.Steps {
			if !s.Batched {
				b.WriteString(s.SQL)
				continue
			}
			query := strings.TrimSuffix(strings.TrimSpace(s.SQL), ";")
			fmt.Fprintf(&b, "-- batched: run until it returns NULL, starting from 0\n"+
				"DO $outbox$\nDECLARE after bigint := 0;\nBEGIN\n"+
				"    WHILE after IS NOT NULL LOOP\n        after := (%s);\n    END LOOP;\nEND\n$outbox$;\n\n",
				strings.ReplaceAll(query, "$1", "after"))
		}
		b.WriteString("\n")
	}
	return b.String(), nil
}

// WithSearchPath returns the connection string dsn (a URL or key=value
// DSN) with search_path set to schemaName, so unqualified table names
// resolve in that schema on every connection it opens.
func WithSearchPath(dsn, schemaName string) string {
	u, err := url.Parse(dsn)
	if err != nil || u.Scheme == "" {
		return strings.TrimSpace(dsn) + " search_path=" + schemaName
	}
	q := u.Query()
	q.Set("search_path", schemaName)
	u.RawQuery = q.Encode()
	return u.String()
}
