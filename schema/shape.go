package schema

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/lib/pq"
)

// ErrTableShape is returned (wrapped) by Migrate when a table it would
// adopt, one that already exists under a configured name, does not have
// the columns, types or primary key the outbox needs. Migrate then applies
// no migration: the message names the table, each column at fault and what
// was expected.
var ErrTableShape = errors.New("existing table does not have the shape the outbox expects")

// column is one column the outbox relies on.
type column struct {
	name    string
	typ     string // as format_type prints it
	notNull bool
	// filled columns have a default (or are an identity): the INSERTs of
	// the outbox leave them out.
	filled bool
	// from and until bound the schema versions that have this column with
	// this type: from <= v < until (until 0: to this day).
	from, until int
}

// table is a table the outbox creates, and the version that creates it.
type table struct {
	name    Name
	created int
	key     []string // primary key columns, in order
	columns []column
}

// tablesOf lists the tables of t (with defaults) and their columns.
func tablesOf(t Tables) []table {
	t = t.WithDefaults()
	ev, _ := ParseName(t.Events)
	pr, _ := ParseName(t.Processed)
	mi, _ := ParseName(t.Migrations)
	c := func(name, typ string, notNull, filled bool) column {
		return column{name: name, typ: typ, notNull: notNull, filled: filled}
	}
	during := func(col column, from, until int) column { col.from, col.until = from, until; return col }
	return []table{
		{name: mi, key: []string{"version"}, columns: []column{
			c("version", "integer", true, false),
			c("name", "text", true, false),
			c("applied_at", "timestamp with time zone", true, true),
		}},
		{name: ev, created: 1, key: []string{"event_id"}, columns: []column{
			c("event_id", "uuid", true, false),
			c("seq", "bigint", true, true),
			c("event_target", "text", true, false),
			c("event_type", "text", true, false),
			c("entity_type", "text", true, false),
			c("entity_id", "text", true, false),
			during(c("event_data", "jsonb", true, false), 1, 3),
			during(c("event_data", "bytea", true, false), 3, 0),
			c("headers", "jsonb", true, true),
			c("event_status", "text", true, true),
			c("attempts", "integer", true, true),
			c("last_error", "text", false, false),
			c("available_at", "timestamp with time zone", true, true),
			c("created_at", "timestamp with time zone", true, true),
			c("published_at", "timestamp with time zone", false, false),
		}},
		{name: pr, created: 1, key: []string{"consumer_id", "message_id"}, columns: []column{
			c("consumer_id", "text", true, false),
			c("message_id", "text", true, false),
			c("processed_at", "timestamp with time zone", true, true),
		}},
		{name: ev.Replicas(), created: 2, key: []string{"replica_id"}, columns: []column{
			c("replica_id", "text", true, false),
			c("partitions", "integer", true, false),
			c("seen_at", "timestamp with time zone", true, true),
		}},
		{name: ev.Leases(), created: 2, key: []string{"part"}, columns: []column{
			c("part", "integer", true, false),
			c("partitions", "integer", true, false),
			c("owner", "text", true, false),
			c("expires_at", "timestamp with time zone", true, false),
			c("acquired_at", "timestamp with time zone", true, true),
		}},
		{name: ev.Control(), created: 4, key: []string{"id"}, columns: []column{
			c("id", "boolean", true, true),
			c("paused", "boolean", true, true),
			c("paused_at", "timestamp with time zone", false, false),
			c("paused_by", "text", false, false),
		}},
	}
}

// queryer is what the shape check needs: *sql.Conn, *sql.Tx or *sql.DB.
type queryer interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

// checkShapes checks every table of t that exists against what schema
// version v (the highest applied) has, or, for a table a later version
// creates, what that version would create: a table Migrate is about to
// adopt must be one it could have made.
func checkShapes(ctx context.Context, q queryer, t Tables, v int) error {
	var problems []string
	for _, tb := range tablesOf(t) {
		p, err := checkShape(ctx, q, tb, max(v, tb.created))
		if err != nil {
			return err
		}
		problems = append(problems, p...)
	}
	if len(problems) > 0 {
		return shapeError(problems)
	}
	return nil
}

// shapeError is the error for problems found in tables Migrate would adopt.
func shapeError(problems []string) error {
	return fmt.Errorf("%w: %s (Migrate adopts only tables it could have created: choose other table names, or rename or fix the existing tables)",
		ErrTableShape, strings.Join(problems, "; "))
}

// checkShape returns what is wrong with table tb against version v, or
// nothing when tb does not exist (Migrate creates it). An unqualified name
// is looked up where CREATE TABLE would put it: the first schema of the
// search_path.
func checkShape(ctx context.Context, q queryer, tb table, v int) ([]string, error) {
	var (
		oid  sql.NullInt64
		kind string
	)
	schemaName := sql.NullString{String: tb.name.Schema, Valid: tb.name.Schema != ""}
	err := q.QueryRowContext(ctx, `SELECT c.oid, c.relkind FROM pg_class c
		JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE n.nspname = coalesce($1, current_schema()) AND c.relname = $2`,
		schemaName, tb.name.Table).Scan(&oid, &kind)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("inspect table %s: %w", tb.name, err)
	case kind != "r" && kind != "p":
		return []string{fmt.Sprintf("%s is not a table (pg_class.relkind %q)", tb.name, kind)}, nil
	}

	type actual struct {
		typ             string
		notNull, filled bool
	}
	have := map[string]actual{}
	var order []string
	rows, err := q.QueryContext(ctx, `SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
			a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> ''
		FROM pg_attribute a
		WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
		ORDER BY a.attnum`, oid.Int64)
	if err != nil {
		return nil, fmt.Errorf("inspect table %s: %w", tb.name, err)
	}
	for rows.Next() {
		var (
			name string
			a    actual
		)
		if err := rows.Scan(&name, &a.typ, &a.notNull, &a.filled); err != nil {
			rows.Close()
			return nil, fmt.Errorf("inspect table %s: %w", tb.name, err)
		}
		have[name] = a
		order = append(order, name)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("inspect table %s: %w", tb.name, err)
	}
	var key []string
	if err := q.QueryRowContext(ctx, `SELECT coalesce(array_agg(a.attname::text ORDER BY k.ord), '{}')
		FROM pg_index i
		CROSS JOIN unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
		JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
		WHERE i.indrelid = $1 AND i.indisprimary`, oid.Int64).Scan(pq.Array(&key)); err != nil {
		return nil, fmt.Errorf("inspect table %s: %w", tb.name, err)
	}

	var problems []string
	bad := func(format string, args ...any) {
		problems = append(problems, fmt.Sprintf("table %s: ", tb.name)+fmt.Sprintf(format, args...))
	}
	known := map[string]bool{}
	for _, c := range tb.columns {
		if v < c.from || c.until > 0 && v >= c.until {
			continue
		}
		known[c.name] = true
		a, ok := have[c.name]
		switch {
		case !ok:
			bad("column %q is missing, expected %s", c.name, c.describe())
		case a.typ != c.typ:
			bad("column %q is %s, expected %s", c.name, a.typ, c.describe())
		case a.notNull != c.notNull:
			bad("column %q is %s, expected %s", c.name, nullability(a.notNull), c.describe())
		case c.filled && !a.filled:
			bad("column %q has no default, expected %s", c.name, c.describe())
		}
	}
	for _, name := range order {
		if a := have[name]; !known[name] && a.notNull && !a.filled {
			bad("column %q is NOT NULL without a default, which the outbox's INSERTs would violate: expected no such column, or a nullable one or one with a default", name)
		}
	}
	if !slices.Equal(key, tb.key) {
		got := "none"
		if len(key) > 0 {
			got = "(" + strings.Join(key, ", ") + ")"
		}
		bad("primary key is %s, expected (%s)", got, strings.Join(tb.key, ", "))
	}
	return problems, nil
}

func nullability(notNull bool) string {
	if notNull {
		return "NOT NULL"
	}
	return "nullable"
}

// describe says what c must be, for error messages.
func (c column) describe() string {
	s := c.typ + " " + nullability(c.notNull)
	if c.filled {
		s += " with a default"
	}
	return s
}
