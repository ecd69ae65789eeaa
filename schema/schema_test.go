package schema_test

import (
	"context"
	"database/sql"
	"errors"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lib/pq"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/schema"
)

func TestParseName(t *testing.T) {
	t.Parallel()
	tests := []struct {
		in   string
		want schema.Name // zero: invalid
	}{
		{"events", schema.Name{Table: "events"}},
		{"s.events", schema.Name{Schema: "s", Table: "events"}},
		{"_x1", schema.Name{Table: "_x1"}},
		{"Billing.Events_2", schema.Name{Schema: "Billing", Table: "Events_2"}},
		{strings.Repeat("a", 63), schema.Name{Table: strings.Repeat("a", 63)}},
		{"", schema.Name{}},
		{"1abc", schema.Name{}},
		{"a-b", schema.Name{}},
		{"a.b.c", schema.Name{}},
		{`"x"`, schema.Name{}},
		{"events; drop", schema.Name{}},
		{"events; drop table x", schema.Name{}},
		{strings.Repeat("a", 64), schema.Name{}},
		{strings.Repeat("a", 64) + ".events", schema.Name{}},
		{".events", schema.Name{}},
		{"s.", schema.Name{}},
		{"ev ents", schema.Name{}},
		{"évents", schema.Name{}},
		{"events\n", schema.Name{}},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			t.Parallel()
			got, err := schema.ParseName(tt.in)
			if tt.want == (schema.Name{}) {
				require.ErrorIs(t, err, schema.ErrInvalidName)
				require.Equal(t, schema.Name{}, got)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tt.want, got)
			require.Equal(t, tt.in, got.String())
		})
	}
}

func TestNameQuoted(t *testing.T) {
	t.Parallel()
	tests := []struct {
		in   string
		want string
	}{
		{"events", `"events"`},
		{"s.events", `"s"."events"`},
		{"Billing.Events", `"Billing"."Events"`},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			t.Parallel()
			n, err := schema.ParseName(tt.in)
			require.NoError(t, err)
			require.Equal(t, tt.want, n.Quoted())
		})
	}
}

func TestTablesValidate(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		tables schema.Tables
		valid  bool
	}{
		{"zero value means defaults", schema.Tables{}, true},
		{"custom names", schema.Tables{Events: "my_events", Processed: "my_processed", Migrations: "my_versions"}, true},
		{"schema-qualified names", schema.Tables{Events: "billing.events", Processed: "billing.processed_message"}, true},
		{"events name at the limit for derived index names", schema.Tables{Events: strings.Repeat("e", 46)}, true},
		{"events name too long for derived index names", schema.Tables{Events: strings.Repeat("e", 47)}, false},
		{"long schema and table names", schema.Tables{Events: strings.Repeat("s", 30) + "." + strings.Repeat("e", 30)}, true},
		{"invalid events name", schema.Tables{Events: "events; drop table x"}, false},
		{"invalid processed name", schema.Tables{Processed: "a-b"}, false},
		{"invalid migrations name", schema.Tables{Migrations: "a.b.c"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			err := tt.tables.Validate()
			if tt.valid {
				require.NoError(t, err)
			} else {
				require.ErrorIs(t, err, schema.ErrInvalidName)
			}
		})
	}
}

func TestTablesWithDefaults(t *testing.T) {
	t.Parallel()
	require.Equal(t, schema.Tables{Events: "events", Processed: "processed_message", Migrations: "events_migrations"},
		schema.Tables{}.WithDefaults())
	require.Equal(t, schema.Tables{Events: "s.ev", Processed: "processed_message", Migrations: "s.ev_migrations"},
		schema.Tables{Events: "s.ev"}.WithDefaults())
}

func TestChannel(t *testing.T) {
	t.Parallel()
	require.Equal(t, "outbox_16384", schema.Channel(16384))
	require.Equal(t, "outbox_3000000000", schema.Channel(3000000000))
}

func TestMigrations(t *testing.T) {
	t.Parallel()

	t.Run("render quoted identifiers", func(t *testing.T) {
		t.Parallel()
		ms, err := schema.Migrations(schema.Tables{Events: "billing.my_events", Processed: "my_processed"})
		require.NoError(t, err)
		require.NotEmpty(t, ms)
		for i, m := range ms {
			require.Equal(t, i+1, m.Version, "versions start at 1 and have no gaps")
			require.NotEmpty(t, m.Name)
			for _, sqlText := range []string{m.Up, m.Down} {
				require.NotContains(t, sqlText, "{{")
				require.NotContains(t, sqlText, "}}")
				require.NotContains(t, sqlText, "<no value>")
			}
		}
		up, down := ms[0].Up, ms[0].Down
		require.Equal(t, "init", ms[0].Name)
		require.Contains(t, up, `CREATE TABLE IF NOT EXISTS "billing"."my_events" (`)
		require.Contains(t, up, `CREATE TABLE IF NOT EXISTS "my_processed" (`)
		require.Contains(t, up, `"my_events_ready_idx" ON "billing"."my_events"`)
		require.Contains(t, up, `FUNCTION "billing"."my_events_notify"()`)
		require.Contains(t, up, `pg_notify('outbox_' || TG_RELID::text, '')`)
		require.NotContains(t, up, `"events"`, "no default name leaks into custom names")
		require.Contains(t, down, `DROP TABLE IF EXISTS "billing"."my_events"`)
		require.Contains(t, down, `DROP TABLE IF EXISTS "my_processed"`)
	})

	t.Run("reject invalid names", func(t *testing.T) {
		t.Parallel()
		ms, err := schema.Migrations(schema.Tables{Events: `events"; DROP TABLE x; --`})
		require.ErrorIs(t, err, schema.ErrInvalidName)
		require.Nil(t, ms)
	})
}

func TestScript(t *testing.T) {
	t.Parallel()
	script, err := schema.Script(schema.Tables{})
	require.NoError(t, err)
	require.Contains(t, script, "-- 0001_init\n")
	require.Contains(t, script, `CREATE TABLE IF NOT EXISTS "events" (`)
	require.Contains(t, script, `CREATE TABLE IF NOT EXISTS "processed_message" (`)
	require.NotContains(t, script, "events_migrations", "the script leaves version bookkeeping to the user's tool")
	require.NotContains(t, script, "{{")

	_, err = schema.Script(schema.Tables{Processed: "bad name"})
	require.ErrorIs(t, err, schema.ErrInvalidName)
}

// newSchema creates an empty PostgreSQL schema, dropped when the test ends,
// and returns a connection whose search_path is that schema.
func newSchema(t *testing.T) (db *sql.DB, admin *sql.DB, name string) {
	t.Helper()
	admin, err := sql.Open("postgres", testenv.DatabaseURL())
	require.NoError(t, err)
	t.Cleanup(func() { admin.Close() })
	name = "schema_" + testenv.Suffix()
	_, err = admin.Exec(`CREATE SCHEMA ` + name)
	require.NoError(t, err)
	t.Cleanup(func() { _, _ = admin.Exec(`DROP SCHEMA ` + name + ` CASCADE`) })

	db, err = sql.Open("postgres", schema.WithSearchPath(testenv.DatabaseURL(), name))
	require.NoError(t, err)
	t.Cleanup(func() { db.Close() })
	return db, admin, name
}

// exists reports whether a relation (table, index) or, with "()", a
// function of that name is visible.
func exists(t *testing.T, db *sql.DB, name string) bool {
	t.Helper()
	query := `SELECT to_regclass($1) IS NOT NULL`
	if strings.HasSuffix(name, "()") {
		query = `SELECT to_regprocedure($1) IS NOT NULL`
	}
	var ok bool
	require.NoError(t, db.QueryRow(query, name).Scan(&ok))
	return ok
}

func TestMigrate(t *testing.T) {
	t.Parallel()
	ctx := context.Background()

	t.Run("applies every version on a fresh schema, then nothing", func(t *testing.T) {
		t.Parallel()
		db, _, _ := newSchema(t)

		applied, err := schema.Migrate(ctx, db, schema.Tables{})
		require.NoError(t, err)
		require.Equal(t, []int{1, 2, 3, 4}, applied)
		for _, name := range []string{"events", "processed_message", "events_migrations",
			"events_seq_idx", "events_ready_idx", "events_entity_idx",
			"processed_message_processed_at_idx", "events_notify()", "events_leases", "events_replicas", "events_control"} {
			require.True(t, exists(t, db, name), "%s is missing", name)
		}
		var recorded []int
		rows, err := db.Query(`SELECT version FROM events_migrations ORDER BY version`)
		require.NoError(t, err)
		for rows.Next() {
			var v int
			require.NoError(t, rows.Scan(&v))
			recorded = append(recorded, v)
		}
		require.NoError(t, rows.Err())
		require.Equal(t, []int{1, 2, 3, 4}, recorded)

		applied, err = schema.Migrate(ctx, db, schema.Tables{})
		require.NoError(t, err)
		require.Empty(t, applied, "a second Migrate applies nothing")
	})

	t.Run("concurrent callers apply the migrations once", func(t *testing.T) {
		t.Parallel()
		db, _, _ := newSchema(t)

		const callers = 4
		var (
			wg      sync.WaitGroup
			applied [callers][]int
			errs    [callers]error
		)
		for i := range callers {
			wg.Go(func() {
				applied[i], errs[i] = schema.Migrate(ctx, db, schema.Tables{})
			})
		}
		wg.Wait()
		once := 0
		for i := range callers {
			require.NoError(t, errs[i], "caller %d", i)
			switch {
			case len(applied[i]) == 0:
			case slices.Equal(applied[i], []int{1, 2, 3, 4}):
				once++
			default:
				t.Fatalf("caller %d applied %v", i, applied[i])
			}
		}
		require.Equal(t, 1, once, "exactly one caller applies them")
	})

	t.Run("schema-qualified custom names", func(t *testing.T) {
		t.Parallel()
		_, admin, name := newSchema(t)
		tables := schema.Tables{Events: name + ".my_events", Processed: name + ".my_processed"}

		// admin has the default search_path: only qualification puts the
		// tables in the test's schema.
		applied, err := schema.Migrate(ctx, admin, tables)
		require.NoError(t, err)
		require.Equal(t, []int{1, 2, 3, 4}, applied)
		for _, rel := range []string{"my_events", "my_processed", "my_events_migrations", "my_events_ready_idx", "my_events_notify()", "my_events_leases", "my_events_control"} {
			require.True(t, exists(t, admin, name+"."+rel), "%s.%s is missing", name, rel)
		}

		// The trigger works: an INSERT (whose NOTIFY needs a valid channel)
		// commits.
		_, err = admin.Exec(`INSERT INTO ` + name + `.my_events (event_id, event_target, event_type, entity_type, entity_id, event_data)
			VALUES (gen_random_uuid(), 'order.OrderCreated', 'OrderCreated', 'order', 'o-1', '{}')`)
		require.NoError(t, err)

		applied, err = schema.Migrate(ctx, admin, tables)
		require.NoError(t, err)
		require.Empty(t, applied)
	})

	t.Run("custom names beside the defaults", func(t *testing.T) {
		t.Parallel()
		db := testenv.NewDB(t) // already holds the default tables
		applied, err := schema.Migrate(ctx, db.DB.DB, schema.Tables{Events: "my_events", Processed: "my_processed"})
		require.NoError(t, err)
		require.Equal(t, []int{1, 2, 3, 4}, applied, "custom tables keep their own version record")
		require.True(t, exists(t, db.DB.DB, "my_events"))
		require.True(t, exists(t, db.DB.DB, "events"))
	})

	t.Run("down migration drops the tables", func(t *testing.T) {
		t.Parallel()
		db, _, _ := newSchema(t)
		tables := schema.Tables{}
		_, err := schema.Migrate(ctx, db, tables)
		require.NoError(t, err)

		ms, err := schema.Migrations(tables)
		require.NoError(t, err)
		for i := len(ms) - 1; i >= 0; i-- {
			_, err := db.Exec(ms[i].Down)
			require.NoError(t, err, "down %04d_%s", ms[i].Version, ms[i].Name)
		}
		for _, name := range []string{"events", "processed_message", "events_notify()"} {
			require.False(t, exists(t, db, name), "%s is still there", name)
		}
	})

	t.Run("script applies on a fresh schema", func(t *testing.T) {
		t.Parallel()
		db, _, _ := newSchema(t)
		script, err := schema.Script(schema.Tables{})
		require.NoError(t, err)
		_, err = db.Exec(script)
		require.NoError(t, err)
		require.True(t, exists(t, db, "events"))
		require.True(t, exists(t, db, "processed_message"))
	})

	t.Run("invalid name touches nothing", func(t *testing.T) {
		t.Parallel()
		db, _, _ := newSchema(t)
		applied, err := schema.Migrate(ctx, db, schema.Tables{Events: "events; drop table x"})
		require.ErrorIs(t, err, schema.ErrInvalidName)
		require.Nil(t, applied)
		require.False(t, exists(t, db, "events_migrations"))
	})
}

// nameSpec is what ParseName must accept: an identifier of letters, digits
// and underscores, not starting with a digit, at most 63 characters,
// optionally qualified by a schema of the same form.
var nameSpec = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$`)

func FuzzParseName(f *testing.F) {
	for _, s := range []string{
		"events", "s.events", "_", "_.x", "Billing.Events_2", strings.Repeat("a", 63), strings.Repeat("a", 64),
		strings.Repeat("b", 63) + "." + strings.Repeat("c", 63), "", ".", "a.", ".a", "a.b.c", "1a", "a-b",
		`"x"`, `a"b`, "events; drop table x", "évents", "events\n", "\nevents", "a\x00b", "select", "user.table",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := schema.ParseName(s)
		if !nameSpec.MatchString(s) {
			if err == nil {
				t.Fatalf("accepted %q, which is not a plain or schema-qualified identifier", s)
			}
			if !errors.Is(err, schema.ErrInvalidName) {
				t.Fatalf("rejected %q with %v, not ErrInvalidName", s, err)
			}
			return
		}
		if err != nil {
			t.Fatalf("rejected %q: %v", s, err)
		}
		if n.String() != s {
			t.Fatalf("ParseName(%q).String() = %q", s, n.String())
		}
		// Identifiers hold no quote, so quoting is wrapping each part.
		want := `"` + strings.ReplaceAll(s, ".", `"."`) + `"`
		if n.Quoted() != want {
			t.Fatalf("ParseName(%q).Quoted() = %s, want %s", s, n.Quoted(), want)
		}
	})
}

// TestNameQuotedRoundTripsThroughPostgres checks with PostgreSQL itself
// that Quoted() names exactly the identifiers given, as quote_ident does,
// whatever their case and even when they are reserved words.
func TestNameQuotedRoundTripsThroughPostgres(t *testing.T) {
	t.Parallel()
	db, _, _ := newSchema(t)
	for _, s := range []string{
		"events", "Events", "_", "select", "user", "s.events", "Billing.Events_2", "public.order",
		strings.Repeat("a", 63), strings.Repeat("Z", 63) + "." + strings.Repeat("_", 63),
	} {
		t.Run(s, func(t *testing.T) {
			n, err := schema.ParseName(s)
			require.NoError(t, err)
			parts := []string{n.Table}
			if n.Schema != "" {
				parts = []string{n.Schema, n.Table}
			}
			var fromQuoted, fromQuoteIdent []string
			require.NoError(t, db.QueryRow(`SELECT parse_ident($1)`, n.Quoted()).Scan(pq.Array(&fromQuoted)))
			require.NoError(t, db.QueryRow(`SELECT parse_ident(array_to_string(
				ARRAY(SELECT quote_ident(p) FROM unnest($1::text[]) AS p), '.'))`, pq.Array(parts)).Scan(pq.Array(&fromQuoteIdent)))
			require.Equal(t, parts, fromQuoted, "parse_ident(%s)", n.Quoted())
			require.Equal(t, fromQuoteIdent, fromQuoted)

			if n.Schema == "" {
				// The table created through Quoted() is the one quote_ident names.
				_, err := db.Exec(`CREATE TABLE ` + n.Quoted() + ` (id int)`)
				require.NoError(t, err)
				var found bool
				require.NoError(t, db.QueryRow(`SELECT to_regclass(quote_ident($1)) IS NOT NULL`, n.Table).Scan(&found))
				require.True(t, found, "quote_ident(%q) does not name the table %s created", n.Table, n.Quoted())
			}
		})
	}
}

// TestMigrateConvertsPayloadsToBytes: migration 0003 turns event_data of a
// populated version-2 table into bytea in batches, each row keeping the
// bytes consumers were sent until then (jsonb's text), and resumes when
// stopped after its first step.
func TestMigrateConvertsPayloadsToBytes(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db, _, _ := newSchema(t)

	applied, err := schema.MigrateTo(ctx, db, schema.Tables{}, 2)
	require.NoError(t, err)
	require.Equal(t, []int{1, 2}, applied)
	rows := 2*schema.BatchRows + 7 // three batches
	_, err = db.Exec(`INSERT INTO events (event_id, event_target, event_type, entity_type, entity_id, event_data, event_status)
		SELECT gen_random_uuid(), 'order.Changed', 'Changed', 'order', 'o-' || (i % 10),
			jsonb_build_object('i', i, 'zeta', 'é', 'alpha', 1.50), (ARRAY['READY', 'SUCCESS', 'FAILED'])[1 + i % 3]
		FROM generate_series(1, $1) i`, rows)
	require.NoError(t, err)
	want := map[string]string{}
	read := func(query string) map[string]string {
		got := map[string]string{}
		r, err := db.Query(query)
		require.NoError(t, err)
		defer r.Close()
		for r.Next() {
			var id, data string
			require.NoError(t, r.Scan(&id, &data))
			got[id] = data
		}
		require.NoError(t, r.Err())
		return got
	}
	want = read(`SELECT event_id, event_data::text FROM events`)
	require.Len(t, want, rows)

	// Stop after the first step, as a migration interrupted there would;
	// a row written meanwhile by a writer still on jsonb is copied by the
	// trigger.
	ms, err := schema.Migrations(schema.Tables{})
	require.NoError(t, err)
	require.Greater(t, len(ms[2].Steps), 1, "0003 runs in steps")
	_, err = db.Exec(ms[2].Steps[0].SQL)
	require.NoError(t, err)
	var late string
	require.NoError(t, db.QueryRow(`INSERT INTO events (event_id, event_target, event_type, entity_type, entity_id, event_data)
		VALUES (gen_random_uuid(), 'order.Changed', 'Changed', 'order', 'late', '{"b": 1, "a": 2}')
		RETURNING event_id`).Scan(&late))
	want[late] = `{"a": 2, "b": 1}`

	applied, err = schema.Migrate(ctx, db, schema.Tables{})
	require.NoError(t, err)
	require.Equal(t, []int{3, 4}, applied)

	var typ string
	var notNull bool
	require.NoError(t, db.QueryRow(`SELECT format_type(atttypid, atttypmod), attnotnull FROM pg_attribute
		WHERE attrelid = 'events'::regclass AND attname = 'event_data'`).Scan(&typ, &notNull))
	require.Equal(t, "bytea", typ)
	require.True(t, notNull, "event_data stays NOT NULL")
	require.Equal(t, want, read(`SELECT event_id, convert_from(event_data, 'UTF8') FROM events`))
	for _, gone := range []string{"events_data_copy()", "events_data_backfill(bigint)"} {
		var ok bool
		require.NoError(t, db.QueryRow(`SELECT to_regprocedure($1) IS NOT NULL`, gone).Scan(&ok))
		require.False(t, ok, "%s is left behind", gone)
	}
	var leftovers int
	require.NoError(t, db.QueryRow(`SELECT (SELECT count(*) FROM pg_attribute WHERE attrelid = 'events'::regclass
			AND attname = 'event_data_new' AND NOT attisdropped)
		+ (SELECT count(*) FROM pg_constraint WHERE conrelid = 'events'::regclass AND conname = 'events_data_not_null')
		+ (SELECT count(*) FROM pg_trigger WHERE tgrelid = 'events'::regclass AND tgname = 'events_data_copy')`).Scan(&leftovers))
	require.Zero(t, leftovers, "temporary column, check or trigger left behind")

	// Down converts back to jsonb.
	_, err = db.Exec(ms[2].Down)
	require.NoError(t, err)
	require.Equal(t, want, read(`SELECT event_id, event_data::text FROM events`))
}

// TestMigrateRefusesTablesOfAnotherShape: a table that already exists under
// a configured name is adopted only if it has the columns, types and key
// the outbox needs; otherwise Migrate applies nothing and says what is
// wrong.
func TestMigrateRefusesTablesOfAnotherShape(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	// eventsDDL is the events table of version 1 with one line replaced.
	eventsDDL := func(from, to string) string {
		ms, err := schema.Migrations(schema.Tables{})
		require.NoError(t, err)
		up := ms[0].Up
		ddl := up[strings.Index(up, "CREATE TABLE") : strings.Index(up, ");")+2]
		require.Contains(t, ddl, from)
		return strings.Replace(ddl, from, to, 1)
	}
	tests := []struct {
		name  string
		setup []string // run before Migrate
		want  []string // in the error; empty: Migrate succeeds
	}{
		{name: "events payload of another type",
			setup: []string{eventsDDL("event_data   jsonb       NOT NULL", "event_data text NOT NULL")},
			want:  []string{`table events: column "event_data" is text, expected jsonb NOT NULL`}},
		{name: "events without seq",
			setup: []string{eventsDDL("seq          bigint      GENERATED ALWAYS AS IDENTITY,", "")},
			want:  []string{`table events: column "seq" is missing, expected bigint NOT NULL with a default`}},
		{name: "events seq without default",
			setup: []string{eventsDDL("GENERATED ALWAYS AS IDENTITY", "NOT NULL")},
			want:  []string{`table events: column "seq" has no default`}},
		{name: "events without primary key",
			setup: []string{eventsDDL("event_id     uuid        PRIMARY KEY", "event_id uuid NOT NULL")},
			want:  []string{`table events: primary key is none, expected (event_id)`}},
		{name: "events last_error NOT NULL",
			setup: []string{eventsDDL("last_error   text,", "last_error text NOT NULL,")},
			want:  []string{`table events: column "last_error" is NOT NULL, expected text nullable`}},
		{name: "events with a NOT NULL column of its own",
			setup: []string{eventsDDL("published_at timestamptz", "published_at timestamptz, tenant text NOT NULL")},
			want:  []string{`table events: column "tenant" is NOT NULL without a default`}},
		{name: "events with a nullable column of its own is adopted",
			setup: []string{eventsDDL("published_at timestamptz", "published_at timestamptz, tenant text")}},
		{name: "events is a view",
			setup: []string{`CREATE VIEW events AS SELECT 1 AS event_id`},
			want:  []string{`events is not a table`}},
		{name: "processed_message keyed by message only",
			setup: []string{`CREATE TABLE processed_message (consumer_id text NOT NULL, message_id text PRIMARY KEY,
				processed_at timestamptz NOT NULL DEFAULT now())`},
			want: []string{`table processed_message: primary key is (message_id), expected (consumer_id, message_id)`}},
		{name: "leases with a text partition",
			setup: []string{`CREATE TABLE events_leases (part text PRIMARY KEY, partitions integer NOT NULL,
				owner text NOT NULL, expires_at timestamptz NOT NULL, acquired_at timestamptz NOT NULL DEFAULT now())`},
			want: []string{`table events_leases: column "part" is text, expected integer NOT NULL`}},
		{name: "replicas missing a column, and two problems at once",
			setup: []string{`CREATE TABLE events_replicas (replica_id text, partitions bigint NOT NULL)`},
			want: []string{`table events_replicas: column "replica_id" is nullable, expected text NOT NULL`,
				`column "partitions" is bigint, expected integer NOT NULL`,
				`column "seen_at" is missing, expected timestamp with time zone NOT NULL with a default`,
				`primary key is none, expected (replica_id)`}},
		{name: "control with a text switch",
			setup: []string{`CREATE TABLE events_control (id boolean PRIMARY KEY DEFAULT true, paused text NOT NULL DEFAULT 'no',
				paused_at timestamptz, paused_by text)`},
			want: []string{`table events_control: column "paused" is text, expected boolean NOT NULL with a default`}},
		{name: "control as created is adopted",
			setup: []string{`CREATE TABLE events_control (id boolean PRIMARY KEY DEFAULT true CHECK (id),
				paused boolean NOT NULL DEFAULT false, paused_at timestamptz, paused_by text)`}},
		{name: "migrations table of another tool",
			setup: []string{`CREATE TABLE events_migrations (version text PRIMARY KEY, dirty boolean NOT NULL)`},
			want: []string{`table events_migrations: column "version" is text, expected integer NOT NULL`,
				`column "dirty" is NOT NULL without a default`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			db, _, _ := newSchema(t)
			for _, s := range tt.setup {
				_, err := db.Exec(s)
				require.NoError(t, err)
			}
			applied, err := schema.Migrate(ctx, db, schema.Tables{})
			if len(tt.want) == 0 {
				require.NoError(t, err)
				require.Equal(t, []int{1, 2, 3, 4}, applied)
				return
			}
			require.ErrorIs(t, err, schema.ErrTableShape)
			for _, w := range tt.want {
				require.Contains(t, err.Error(), w)
			}
			require.Empty(t, applied)
			require.False(t, exists(t, db, "events_ready_idx"), "nothing is applied")
		})
	}

	t.Run("a table changed after its version was applied", func(t *testing.T) {
		t.Parallel()
		db, _, _ := newSchema(t)
		_, err := schema.Migrate(ctx, db, schema.Tables{})
		require.NoError(t, err)
		_, err = db.Exec(`ALTER TABLE events ALTER COLUMN event_data TYPE jsonb USING convert_from(event_data, 'UTF8')::jsonb`)
		require.NoError(t, err)
		_, err = schema.Migrate(ctx, db, schema.Tables{})
		require.ErrorIs(t, err, schema.ErrTableShape)
		require.Contains(t, err.Error(), `table events: column "event_data" is jsonb, expected bytea NOT NULL`)
	})
}

// TestMigrateRetriesAStepThatWaitedTooLongForItsLock: 0003's short
// exclusive steps give up waiting for their lock after lock_timeout, so
// writers never queue behind them for long; Migrate tries them again until
// the transaction in the way has ended.
func TestMigrateRetriesAStepThatWaitedTooLongForItsLock(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db, _, _ := newSchema(t)
	_, err := schema.MigrateTo(ctx, db, schema.Tables{}, 2)
	require.NoError(t, err)

	// A long writer transaction holds the table, as an open INSERT would.
	blocker, err := db.BeginTx(ctx, nil)
	require.NoError(t, err)
	defer blocker.Rollback() //nolint:errcheck
	_, err = blocker.Exec(`LOCK TABLE events IN ROW EXCLUSIVE MODE`)
	require.NoError(t, err)

	done := make(chan error, 1)
	go func() {
		_, err := schema.Migrate(ctx, db, schema.Tables{})
		done <- err
	}()
	// waiting returns the start of the transaction that waits for a lock
	// on events, or the zero time.
	waiting := func() time.Time {
		var start time.Time
		err := db.QueryRow(`SELECT a.xact_start FROM pg_locks l JOIN pg_stat_activity a USING (pid)
			WHERE l.relation = 'events'::regclass AND NOT l.granted`).Scan(&start)
		if errors.Is(err, sql.ErrNoRows) {
			return time.Time{}
		}
		require.NoError(t, err)
		return start
	}
	var first time.Time
	testenv.Eventually(t, 30*time.Second, func() bool { first = waiting(); return !first.IsZero() },
		"migrate waits for its lock")
	testenv.Eventually(t, 30*time.Second, func() bool { w := waiting(); return !w.IsZero() && !w.Equal(first) },
		"migrate gave up waiting and tried again in a new transaction")
	require.NoError(t, blocker.Rollback())
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(60 * time.Second):
		t.Fatal("Migrate did not return after the blocker ended")
	}
}

// A statement_timeout (and lock_timeout) set for the role, the database or
// in the connection string, shorter than a step of a big table's
// migration, does not make Migrate fail on every run: it lifts them for
// its own session and restores them before handing the connection back.
func TestMigrateIgnoresTheSessionsStatementTimeout(t *testing.T) {
	t.Parallel()
	db, _, name := newSchema(t)
	_, err := schema.MigrateTo(context.Background(), db, schema.Tables{}, 2)
	require.NoError(t, err)
	_, err = db.Exec(`INSERT INTO events (event_id, event_target, event_type, entity_type, entity_id, event_data, event_status)
		SELECT gen_random_uuid(), 'order.Changed', 'Changed', 'order', 'o-' || (i % 10), jsonb_build_object('i', i), 'SUCCESS'
		FROM generate_series(1, 60000) i`)
	require.NoError(t, err)
	limited, err := sql.Open("postgres", schema.WithSearchPath(testenv.DatabaseURL(), name)+"&statement_timeout=20&lock_timeout=20")
	require.NoError(t, err)
	t.Cleanup(func() { limited.Close() })
	limited.SetMaxOpenConns(1) // the connection Migrate used is the one read below

	applied, err := schema.Migrate(context.Background(), limited, schema.Tables{})
	require.NoError(t, err)
	require.Equal(t, []int{3, 4}, applied)
	var st, lt string
	require.NoError(t, limited.QueryRow(`SELECT current_setting('statement_timeout'), current_setting('lock_timeout')`).Scan(&st, &lt))
	require.Equal(t, []string{"20ms", "20ms"}, []string{st, lt}, "the connection's own timeouts are back")
}
