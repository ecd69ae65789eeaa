package integration

import (
	"cmp"
	"encoding/json"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
	"github.com/pgnats/outbox/schema"
)

// TestCLI runs the publisher's management commands as a user would and
// checks their output and exit status.
func TestCLI(t *testing.T) {
	t.Parallel()

	t.Run("migrate applies then reports up to date", func(t *testing.T) {
		t.Parallel()
		dsn, db := emptySchema(t)
		r := requireCLI(t, "migrate", "--database-url", dsn)
		require.Contains(t, r.stdout, "applied migration 0001")
		var tables []string
		require.NoError(t, db.Select(&tables, `SELECT table_name FROM information_schema.tables
			WHERE table_schema = current_schema() ORDER BY table_name`))
		require.Equal(t, []string{"events", "events_control", "events_leases", "events_migrations", "events_replicas", "processed_message"}, tables)

		r = requireCLI(t, "migrate", "--database-url", dsn)
		require.Contains(t, r.stdout, "schema is up to date")
		require.NotContains(t, r.stdout, "applied migration")
	})

	t.Run("migrate --print writes the SQL without a database", func(t *testing.T) {
		t.Parallel()
		r := requireCLI(t, "migrate", "--print", "--database-url", unreachableDSN)
		require.Contains(t, r.stdout, `CREATE TABLE IF NOT EXISTS "events"`)
		require.Contains(t, r.stdout, `CREATE TABLE IF NOT EXISTS "processed_message"`)
	})

	t.Run("status shows counts and FAILED events", func(t *testing.T) {
		t.Parallel()
		b, failedID := statusFixture(t)
		r := requireCLI(t, "status", "--database-url", b.db.DSN)
		out := r.stdout
		require.Regexp(t, `(?m)^READY\s+3\s`, out)
		require.Regexp(t, `(?m)^SUCCESS\s+2$`, out)
		require.Regexp(t, `(?m)^FAILED\s+1$`, out)
		require.Regexp(t, `(?m)^blocked entities\s+1$`, out)
		require.Regexp(t, `(?m)^leader\s+none`, out)
		require.Regexp(t, `(?m)^`+failedID+`\s+`+regexp.QuoteMeta(b.prefix)+`\.order\.updated\s+order/b\s+1\s+no JetStream stream covers subject`, out,
			"FAILED event listed with its subject, entity, attempts and reason")
	})

	t.Run("status --json", func(t *testing.T) {
		t.Parallel()
		b, failedID := statusFixture(t)
		r := requireCLI(t, "status", "--json", "--database-url", b.db.DSN)
		var st struct {
			Counts  map[string]int `json:"counts"`
			Blocked []struct {
				EntityID string `json:"entity_id"`
				EventID  string `json:"blocking_event_id"`
				Waiting  int    `json:"waiting_events"`
			} `json:"blocked_entities"`
			RecentFailed []struct {
				EventID   string `json:"event_id"`
				LastError string `json:"last_error"`
			} `json:"recent_failed"`
		}
		require.NoError(t, json.Unmarshal([]byte(r.stdout), &st), "status --json output:\n%s", r.stdout)
		require.Equal(t, map[string]int{"READY": 3, "SUCCESS": 2, "FAILED": 1}, st.Counts)
		require.Len(t, st.RecentFailed, 1)
		require.Equal(t, failedID, st.RecentFailed[0].EventID)
		require.Contains(t, st.RecentFailed[0].LastError, "no JetStream stream covers subject")
		require.Len(t, st.Blocked, 1)
		require.Equal(t, "b", st.Blocked[0].EntityID)
		require.Equal(t, failedID, st.Blocked[0].EventID)
		require.Equal(t, 2, st.Blocked[0].Waiting)
	})

	t.Run("requeue", func(t *testing.T) {
		t.Parallel()
		b, failedID := statusFixture(t)
		dsn := b.db.DSN

		r := requireCLI(t, "requeue", "--dry-run", "--all", "--database-url", dsn)
		require.Contains(t, r.stdout, "would requeue 1 FAILED event\n")
		require.Equal(t, 1, b.db.Count(t, "FAILED"), "a dry run changes nothing")

		r = requireCLI(t, "requeue", "--id", failedID, "--database-url", dsn)
		require.Contains(t, r.stdout, "requeued 1 FAILED event\n")
		var row struct {
			Status   string `db:"event_status"`
			Attempts int    `db:"attempts"`
		}
		require.NoError(t, b.db.Get(&row, `SELECT event_status, attempts FROM events WHERE event_id = $1`, failedID))
		require.Equal(t, "READY", row.Status)
		require.Zero(t, row.Attempts)

		r = requireCLI(t, "requeue", "--all", "--database-url", dsn)
		require.Contains(t, r.stdout, "requeued 0 FAILED events")

		_, err := b.db.Exec(`UPDATE events SET event_status = 'FAILED', attempts = 1 WHERE event_id = $1`, failedID)
		require.NoError(t, err)
		r = requireCLI(t, "requeue", "--entity", "order/b", "--database-url", dsn)
		require.Contains(t, r.stdout, "requeued 1 FAILED event\n")
		require.Zero(t, b.db.Count(t, "FAILED"))
	})

	t.Run("usage errors exit 2", func(t *testing.T) {
		t.Parallel()
		for _, tc := range []struct {
			name   string
			args   []string
			env    []string
			stderr string
		}{
			{"unknown flag", []string{"status", "--no-such-flag"}, nil, "flag provided but not defined: -no-such-flag"},
			{"unknown command", []string{"frobnicate"}, nil, `unknown command "frobnicate"`},
			{"stray argument", []string{"status", "extra"}, nil, `unexpected argument "extra"`},
			{"requeue without selector", []string{"requeue", "--database-url", unreachableDSN}, nil, "exactly one of --id, --entity or --all"},
			{"requeue with two selectors", []string{"requeue", "--all", "--id", "x"}, nil, "exactly one of --id, --entity or --all"},
			{"requeue bad entity", []string{"requeue", "--entity", "nothing"}, nil, "use TYPE/ID"},
			{"zero batch size", []string{"run", "--batch-size", "0", "--database-url", unreachableDSN}, nil, "--batch-size and --max-attempts must be at least 1"},
			{"bad duration", []string{"run", "--poll-interval", "soon"}, nil, "invalid value"},
			{"bad log level", []string{"run", "--log-level", "loud", "--database-url", unreachableDSN}, nil, "--log-level"},
			{"bad env var", []string{"run", "--database-url", unreachableDSN}, []string{"OUTBOX_BATCH_SIZE=many"}, "OUTBOX_BATCH_SIZE"},
			{"status limit", []string{"status", "--limit", "0"}, nil, "--limit must be at least 1"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				t.Parallel()
				r := cliEnv(t, tc.env, tc.args...)
				require.Equal(t, 2, r.code, "exit status; stderr:\n%s", r.stderr)
				require.Contains(t, r.stderr, tc.stderr)
			})
		}
	})

	t.Run("help lists flags with their environment variables", func(t *testing.T) {
		t.Parallel()
		r := requireCLI(t, "--help")
		for _, cmd := range []string{"run", "migrate", "status", "requeue", "version"} {
			require.Regexp(t, `(?m)^\s+`+cmd+`\s`, r.stdout, "top-level help lists %s", cmd)
		}
		for _, tc := range []struct {
			cmd   string
			flags map[string]string // flag -> env vars
		}{
			{"run", map[string]string{
				"--database-url":  "env OUTBOX_DATABASE_URL, DATABASE_URL",
				"--nats-url":      "env OUTBOX_NATS_URL, NATS_URL",
				"--batch-size":    "env OUTBOX_BATCH_SIZE",
				"--poll-interval": "env OUTBOX_POLL_INTERVAL",
				"--max-attempts":  "env OUTBOX_MAX_ATTEMPTS",
				"--table":         "env OUTBOX_TABLE",
			}},
			{"status", map[string]string{"--json": "env OUTBOX_JSON", "--database-url": "DATABASE_URL"}},
			{"requeue", map[string]string{"--id": "env OUTBOX_ID", "--dry-run": "env OUTBOX_DRY_RUN"}},
			{"migrate", map[string]string{"--print": "env OUTBOX_PRINT"}},
		} {
			r := requireCLI(t, tc.cmd, "--help")
			for flag, env := range tc.flags {
				require.Regexp(t, `(?m)^\s+`+flag+`\b.*\n.*\n\s+\(.*`+regexp.QuoteMeta(env), r.stdout,
					"%s --help lists %s with %s", tc.cmd, flag, env)
			}
		}
	})

	t.Run("version", func(t *testing.T) {
		t.Parallel()
		r := requireCLI(t, "version")
		require.Regexp(t, `^publisher \S+ \(go\S+\)\n$`, r.stdout)
	})

	t.Run("environment variables configure commands", func(t *testing.T) {
		t.Parallel()
		b, _ := statusFixture(t)
		r := cliEnv(t, []string{"DATABASE_URL=" + b.db.DSN}, "status", "--json")
		require.Zero(t, r.code, r.stderr)
		require.Contains(t, r.stdout, `"FAILED": 1`)
		// A flag wins over its environment variables.
		r = cliEnv(t, []string{"DATABASE_URL=" + unreachableDSN, "OUTBOX_JSON=true"}, "status", "--database-url", b.db.DSN)
		require.Zero(t, r.code, r.stderr)
		require.Contains(t, r.stdout, `"FAILED": 1`, "OUTBOX_JSON=true selects JSON")
	})

	t.Run("unreachable database exits 1 and says how to fix it", func(t *testing.T) {
		t.Parallel()
		for _, args := range [][]string{
			{"status"}, {"migrate"}, {"requeue", "--all"},
		} {
			r := cli(t, append(args, "--database-url", unreachableDSN)...)
			require.Equal(t, 1, r.code, "%v: exit status; stderr:\n%s", args, r.stderr)
			require.Contains(t, r.stderr, "PostgreSQL is unreachable at postgres://postgres@127.0.0.1:1/test")
			require.Contains(t, r.stderr, "start PostgreSQL there, or point --database-url (or DATABASE_URL) at a running server")
		}
	})

	t.Run("passwords never appear in output", func(t *testing.T) {
		t.Parallel()
		const secret = "s3cretpw"
		dsns := []string{
			"postgres://postgres:" + secret + "@127.0.0.1:1/test?sslmode=disable",
			"postgres://postgres@127.0.0.1:1/test?sslmode=disable&password=" + secret,
			"host=127.0.0.1 port=1 user=postgres password=" + secret + " dbname=test sslmode=disable",
		}
		if u, err := url.Parse(testenv.DatabaseURL()); err == nil && u.Host != "" {
			// The server answers, and refuses for another reason.
			u.User = url.UserPassword(cmp.Or(u.User.Username(), "postgres"), secret)
			u.Path = "/no_such_db_" + testenv.Suffix()
			dsns = append(dsns, u.String())
		}
		for _, dsn := range dsns {
			for _, args := range [][]string{{"status"}, {"migrate"}, {"requeue", "--all"}} {
				r := cli(t, append(args, "--database-url", dsn)...)
				require.Equal(t, 1, r.code, "%v: stderr:\n%s", args, r.stderr)
				require.NotContains(t, r.stdout+r.stderr, secret, "%v with %q", args, dsn)
			}
		}

		// The publisher waits for an unreachable database, logging each try.
		p := startProcess(t, "publisher (no database)", []string{"run", "--database-url", dsns[0], "--backoff-max", "200ms"}, nil)
		p.WaitLog(t, `msg="database unreachable; retrying"`, 10*time.Second)
		p.Term()
		require.Zero(t, p.Wait(t, 10*time.Second))
		require.NotContains(t, p.Logs(), secret)
		require.Contains(t, p.Logs(), "postgres:xxxxx@127.0.0.1:1")

		// A NATS URL's password is hidden too, while the broker is down.
		b, _ := statusFixture(t)
		p = startPublisher(t, "publisher (no NATS)", b.db.DSN, "--nats-url", "nats://user:"+secret+"@127.0.0.1:1")
		// The start-up stream check gives up after 10s and logs why.
		p.WaitLog(t, `msg="could not check streams at start"`, 30*time.Second)
		p.Kill() // a stop would wait for the batch it is trying to send
		p.Wait(t, 10*time.Second)
		require.NotContains(t, p.Logs(), secret)
		require.Contains(t, p.Logs(), "nats://user:xxxxx@127.0.0.1:1")
	})
}

// unreachableDSN points at a port where no PostgreSQL listens.
const unreachableDSN = "postgres://postgres@127.0.0.1:1/test?sslmode=disable"

// emptySchema creates a schema without tables, dropped when the test ends,
// and returns a DSN whose search_path is it and a connection through it.
func emptySchema(t *testing.T) (string, *sqlx.DB) {
	t.Helper()
	admin, err := sqlx.Open("postgres", testenv.DatabaseURL())
	require.NoError(t, err)
	name := "t_" + testenv.Suffix()
	_, err = admin.Exec(`CREATE SCHEMA ` + name)
	require.NoError(t, err)
	t.Cleanup(func() {
		_, _ = admin.Exec(`DROP SCHEMA ` + name + ` CASCADE`)
		admin.Close()
	})
	dsn := schema.WithSearchPath(testenv.DatabaseURL(), name)
	db, err := sqlx.Open("postgres", dsn)
	require.NoError(t, err)
	t.Cleanup(func() { db.Close() })
	return dsn, db
}

// statusFixture writes three events for each of entities order/a and
// order/b, then marks a's first two SUCCESS and b's first FAILED, as the
// publisher would: 3 READY (two of them blocked behind the FAILED one),
// 2 SUCCESS, 1 FAILED. It returns the FAILED event's id.
func statusFixture(t *testing.T) (*bundle, string) {
	t.Helper()
	prefix := "t" + testenv.Suffix()
	b := newBundle(t, nil, "", prefix)
	subject := prefix + ".order.updated"
	tx, err := b.db.Beginx()
	require.NoError(t, err)
	var events []outbox.Event
	for _, e := range []string{"a", "b"} {
		for n := 1; n <= 3; n++ {
			events = append(events, outbox.Event{EntityType: "order", EntityID: e, Type: "OrderUpdated",
				Subject: subject, Data: payload{Entity: e, N: n}})
		}
	}
	ids, err := b.w.Write(t.Context(), tx, events...)
	require.NoError(t, err)
	require.NoError(t, tx.Commit())
	_, err = b.db.Exec(`UPDATE events SET event_status = 'SUCCESS', published_at = now() WHERE event_id = ANY($1::uuid[])`,
		"{"+ids[0].String()+","+ids[1].String()+"}")
	require.NoError(t, err)
	reason := `no JetStream stream covers subject "` + subject + `"`
	_, err = b.db.Exec(`UPDATE events SET event_status = 'FAILED', attempts = 1, last_error = $2 WHERE event_id = $1`,
		ids[3].String(), reason)
	require.NoError(t, err)
	return b, strings.ToLower(ids[3].String())
}
