package integration

import (
	"cmp"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
)

// tokenNATS starts an in-process NATS server with JetStream that admits
// only clients presenting token, and returns its URL (without the token).
func tokenNATS(t *testing.T, token string) string {
	t.Helper()
	return testenv.StartNATSServer(t, &server.Options{JetStream: true, Authorization: token}).URL()
}

// passwordRole creates a PostgreSQL login role with a password, allowed to
// use the test's schema and its tables, and returns b's DSN logging in as
// it. The role is dropped when the test ends. (The test server trusts
// local connections, so the password is sent but not checked: what matters
// here is that it is in the DSN.)
func passwordRole(t *testing.T, b *bundle, password string) string {
	t.Helper()
	admin, err := sqlx.Open("postgres", testenv.DatabaseURL())
	require.NoError(t, err)
	role := "outbox_secret_" + testenv.Suffix()
	_, err = admin.Exec(`CREATE ROLE ` + role + ` LOGIN PASSWORD '` + password + `'`)
	require.NoError(t, err)
	t.Cleanup(func() {
		_, _ = admin.Exec(`DROP OWNED BY ` + role)
		_, _ = admin.Exec(`DROP ROLE ` + role)
		admin.Close()
	})
	for _, grant := range []string{
		`GRANT USAGE ON SCHEMA ` + b.db.Schema + ` TO ` + role,
		// What docs/OPERATIONS.md says the publisher needs, no more.
		`GRANT SELECT, UPDATE ON ALL TABLES IN SCHEMA ` + b.db.Schema + ` TO ` + role,
	} {
		_, err = admin.Exec(grant)
		require.NoError(t, err)
	}
	u, err := url.Parse(b.db.DSN)
	require.NoError(t, err)
	u.User = url.UserPassword(role, password)
	return u.String()
}

// TestSecretsNeverAppearInOutput runs the binary with a database password
// and a NATS token, in every way they can be given, and searches all it
// writes, logs at debug level in both formats and status output, for them.
func TestSecretsNeverAppearInOutput(t *testing.T) {
	t.Parallel()
	password := "pw-" + testenv.Suffix() + "-Secret"
	token := "tok-" + testenv.Suffix() + "-Secret"
	natsURL := tokenNATS(t, token)
	nc, err := nats.Connect(natsURL, nats.Token(token))
	require.NoError(t, err)
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	prefix := "t" + testenv.Suffix()
	b := newBundle(t, js, createStream(t, js, jetstream.StreamConfig{Subjects: []string{prefix + ".>"}}), prefix)
	dsn := passwordRole(t, b, password)
	tokenURL := strings.Replace(natsURL, "nats://", "nats://"+token+"@", 1)

	requireNoSecret := func(what, out string) {
		t.Helper()
		require.NotContains(t, out, password, "%s shows the database password:\n%s", what, out)
		require.NotContains(t, out, token, "%s shows the NATS token:\n%s", what, out)
	}

	// Text logs; the password in --database-url, the token in --nats-token.
	text := startPublisher(t, "text", dsn, "--nats-url", natsURL, "--nats-token", token, "--log-level", "debug")
	b.writeAll(t, entityNames("a", 5), 30)
	b.waitAllSuccess(t, 30, 30*time.Second)
	text.Term()
	require.Zero(t, text.Wait(t, 30*time.Second))
	requireNoSecret("run --log-format text", text.Logs())
	require.Contains(t, text.Logs(), "xxxxx", "the DSN is logged redacted")

	// JSON logs; the DSN and the token in the environment, the token inside
	// the NATS URL.
	jsonRun := startProcess(t, "json", append([]string{"run", "--log-format", "json", "--log-level", "debug"}, fastFlags...),
		[]string{"DATABASE_URL=" + dsn, "NATS_URL=" + tokenURL})
	b.writeAll(t, entityNames("b", 5), 30)
	b.waitAllSuccess(t, 60, 30*time.Second)
	jsonRun.Term()
	require.Zero(t, jsonRun.Wait(t, 30*time.Second))
	requireNoSecret("run --log-format json", jsonRun.Logs())

	// The token from OUTBOX_NATS_TOKEN, JSON logs.
	envRun := startProcess(t, "env", append([]string{"run", "--log-format", "json", "--nats-url", natsURL}, fastFlags...),
		[]string{"OUTBOX_DATABASE_URL=" + dsn, "OUTBOX_NATS_TOKEN=" + token})
	b.writeAll(t, entityNames("c", 5), 30)
	b.waitAllSuccess(t, 90, 30*time.Second)
	envRun.Term()
	require.Zero(t, envRun.Wait(t, 30*time.Second))
	requireNoSecret("run with OUTBOX_NATS_TOKEN", envRun.Logs())

	for _, args := range [][]string{
		{"status", "--database-url", dsn},
		{"status", "--database-url", dsn, "--json"},
		{"status", "--database-url", dsn, "--log-format", "json", "--log-level", "debug"},
	} {
		r := cli(t, args...)
		require.Zero(t, r.code, "publisher status: %s", r.stderr)
		requireNoSecret(strings.Join(args[2:], " ")+" stdout", r.stdout)
		requireNoSecret(strings.Join(args[2:], " ")+" stderr", r.stderr)
	}
	r := cliEnv(t, []string{"DATABASE_URL=" + dsn}, "status", "--json")
	require.Zero(t, r.code, r.stderr)
	requireNoSecret("status with DATABASE_URL", r.stdout+r.stderr)
	require.Contains(t, r.stdout, `"SUCCESS": 90`)

	// An error that names the database: the address is shown, not the
	// password.
	unreachable := strings.Replace(dsn, "127.0.0.1:5432", "127.0.0.1:1", 1)
	require.NotEqual(t, dsn, unreachable)
	r = cli(t, "status", "--database-url", unreachable)
	require.Equal(t, 1, r.code)
	require.Contains(t, r.stderr, "PostgreSQL is unreachable")
	requireNoSecret("status against an unreachable database", r.stdout+r.stderr)
}

// TestWrongNATSTokenFailsClearly: a publisher whose token the server
// refuses exits 1 at once, saying so, without echoing the token.
func TestWrongNATSTokenFailsClearly(t *testing.T) {
	t.Parallel()
	natsURL := tokenNATS(t, "tok-"+testenv.Suffix()+"-Right")
	b := newBundle(t, nil, "", "t"+testenv.Suffix())
	wrong := "tok-" + testenv.Suffix() + "-Wrong"
	for name, args := range map[string][]string{
		"--nats-token": {"--nats-url", natsURL, "--nats-token", wrong},
		"token in URL": {"--nats-url", strings.Replace(natsURL, "nats://", "nats://"+wrong+"@", 1)},
		"no token":     {"--nats-url", natsURL},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			p := startPublisher(t, name, b.db.DSN, args...)
			require.Equal(t, 1, p.Wait(t, 30*time.Second), "exit status; logs:\n%s", p.Logs())
			require.Contains(t, p.Logs(), "refused the credentials")
			require.Contains(t, strings.ToLower(p.Logs()), "nats: authorization violation")
			require.NotContains(t, p.Logs(), wrong)
		})
	}
}

// TestPasswordsWithURLDelimitersNeverAppear runs the binary with database
// and NATS passwords holding '#', '%', '@' and '/', written as a user might
// (unescaped) and as they should be (escaped, or quoted key=value), and
// searches everything it writes for any part of them.
func TestPasswordsWithURLDelimitersNeverAppear(t *testing.T) {
	t.Parallel()
	head := "Pw" + testenv.Suffix()
	pw := head + "#se%cr@t/x"
	// escaped is pw as it goes in a URL's user info.
	escaped := strings.TrimPrefix(url.UserPassword("u", pw).String(), "u:")
	requireNoSecret := func(what, out string) {
		t.Helper()
		for _, part := range []string{head, "se%cr", escaped, url.QueryEscape(pw)} {
			require.NotContains(t, out, part, "%s shows (part of) the password:\n%s", what, out)
		}
	}

	t.Run("unescaped in a URL: refused at start, unseen", func(t *testing.T) {
		t.Parallel()
		for _, args := range [][]string{
			{"run", "--database-url", "postgres://postgres:" + pw + "@127.0.0.1:5432/test?sslmode=disable"},
			{"status", "--database-url", "postgresql://postgres:" + pw + "@127.0.0.1:5432/test"},
			{"run", "--database-url", unreachableDSN, "--nats-url", "nats://user:" + pw + "@127.0.0.1:1"},
		} {
			r := cli(t, args...)
			require.Equal(t, 2, r.code, "%v: exit status; stderr:\n%s", args[0], r.stderr)
			require.Contains(t, r.stderr, "percent-encode")
			requireNoSecret(args[0]+" stderr", r.stderr)
			requireNoSecret(args[0]+" stdout", r.stdout)
		}
	})

	t.Run("escaped or quoted, while the database is unreachable", func(t *testing.T) {
		t.Parallel()
		for i, dsn := range []string{
			"postgres://postgres:" + escaped + "@127.0.0.1:1/test?sslmode=disable",
			"postgres://postgres@127.0.0.1:1/test?sslmode=disable&password=" + url.QueryEscape(pw),
			"host=127.0.0.1 port=1 user=postgres password='" + pw + "' dbname=test sslmode=disable",
		} {
			p := startProcess(t, fmt.Sprintf("publisher %d (no database)", i),
				[]string{"run", "--database-url", dsn, "--backoff-max", "200ms", "--log-format", "json"}, nil)
			p.WaitLog(t, `"msg":"database unreachable; retrying"`, 10*time.Second)
			p.Term()
			require.Zero(t, p.Wait(t, 10*time.Second))
			requireNoSecret("run against an unreachable database", p.Logs())
			require.Contains(t, p.Logs(), "xxxxx")
		}
	})

	t.Run("the server refuses the login", func(t *testing.T) {
		t.Parallel()
		u, err := url.Parse(testenv.DatabaseURL())
		require.NoError(t, err)
		u.User = url.UserPassword(cmp.Or(u.User.Username(), "postgres"), pw)
		u.Path = "/no_such_db_" + testenv.Suffix()
		for _, args := range [][]string{{"status"}, {"migrate"}} {
			r := cli(t, append(args, "--database-url", u.String(), "--log-level", "debug")...)
			require.Equal(t, 1, r.code, "%v: stderr:\n%s", args, r.stderr)
			require.Contains(t, r.stderr, "refused the connection")
			requireNoSecret(args[0], r.stdout+r.stderr)
		}
	})

	t.Run("NATS password escaped, while the broker is unreachable", func(t *testing.T) {
		t.Parallel()
		b, _ := statusFixture(t)
		p := startPublisher(t, "publisher (no NATS)", b.db.DSN, "--nats-url", "nats://user:"+escaped+"@127.0.0.1:1")
		p.WaitLog(t, `msg="could not check streams at start"`, 30*time.Second)
		p.Kill()
		p.Wait(t, 10*time.Second)
		requireNoSecret("run against an unreachable broker", p.Logs())
	})
}
