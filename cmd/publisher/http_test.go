package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// request sends a request to h and returns the status and body.
func request(t *testing.T, h http.Handler, method, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequestWithContext(t.Context(), method, path, nil))
	body, err := io.ReadAll(rec.Result().Body)
	require.NoError(t, err)
	return rec.Code, string(body)
}

func readyBody(t *testing.T, body string) readyReport {
	t.Helper()
	var r readyReport
	require.NoError(t, json.Unmarshal([]byte(body), &r), body)
	return r
}

func TestHTTPEndpoints(t *testing.T) {
	t.Parallel()
	discard := slog.New(slog.DiscardHandler)
	m := poller.NewMetrics()
	m.Leader.Set(1)

	t.Run("healthz answers while starting, readyz does not", func(t *testing.T) {
		t.Parallel()
		h := newHTTPHandler(newRegistry(poller.NewMetrics()), &readiness{}, discard)
		code, body := request(t, h, http.MethodGet, pathHealthz)
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, "ok\n", body)
		code, body = request(t, h, http.MethodGet, pathReadyz)
		require.Equal(t, http.StatusServiceUnavailable, code)
		require.Equal(t, readyReport{Role: roleStarting, Database: "not connected yet", NATS: "not connected yet"}, readyBody(t, body))
	})

	t.Run("ready when database and broker answer; standby until elected", func(t *testing.T) {
		t.Parallel()
		db := testenv.NewDB(t)
		nc, _ := testenv.NATS(t)
		var rd readiness
		rd.db.Store(db.DB.DB)
		rd.nc.Store(nc)
		h := newHTTPHandler(newRegistry(m), &rd, discard)
		code, body := request(t, h, http.MethodGet, pathReadyz)
		require.Equal(t, http.StatusOK, code, body)
		require.Equal(t, readyReport{Ready: true, Role: roleStarting, Database: "ok", NATS: "ok"}, readyBody(t, body))

		p, err := poller.New(poller.Config{DB: db.DB.DB, DSN: db.DSN, NATS: nc})
		require.NoError(t, err)
		rd.poller.Store(p)
		_, body = request(t, h, http.MethodGet, pathReadyz)
		require.Equal(t, roleStandby, readyBody(t, body).Role, "a poller that does not lead stands by")

		nc.Close()
		code, body = request(t, h, http.MethodGet, pathReadyz)
		require.Equal(t, http.StatusServiceUnavailable, code)
		require.Equal(t, "connection closed for good", readyBody(t, body).NATS)
		code, body = request(t, h, http.MethodGet, pathHealthz)
		require.Equal(t, http.StatusServiceUnavailable, code, "a connection closed for good is not healthy")
		require.Equal(t, "NATS connection closed for good\n", body)
	})

	t.Run("unreachable database is not ready", func(t *testing.T) {
		t.Parallel()
		db, err := sql.Open("postgres", "postgres://postgres@127.0.0.1:1/test?sslmode=disable&connect_timeout=1")
		require.NoError(t, err)
		t.Cleanup(func() { db.Close() })
		var rd readiness
		rd.db.Store(db)
		code, body := request(t, newHTTPHandler(newRegistry(poller.NewMetrics()), &rd, discard), http.MethodGet, pathReadyz)
		require.Equal(t, http.StatusServiceUnavailable, code)
		require.True(t, strings.HasPrefix(readyBody(t, body).Database, "unreachable: "), body)
	})

	t.Run("metrics in the text format", func(t *testing.T) {
		t.Parallel()
		h := newHTTPHandler(newRegistry(m), &readiness{}, discard)
		code, body := request(t, h, http.MethodGet, pathMetrics)
		require.Equal(t, http.StatusOK, code)
		require.Contains(t, body, "\noutbox_leader 1\n")
		require.Contains(t, body, `outbox_events_published_total{outcome="success"} 0`)
		require.Contains(t, body, "\ngo_goroutines ")
	})

	t.Run("only GET", func(t *testing.T) {
		t.Parallel()
		h := newHTTPHandler(newRegistry(poller.NewMetrics()), &readiness{}, discard)
		code, _ := request(t, h, http.MethodPost, pathHealthz)
		require.Equal(t, http.StatusMethodNotAllowed, code)
		code, _ = request(t, h, http.MethodGet, "/nothing")
		require.Equal(t, http.StatusNotFound, code)
	})
}

// TestRunStartErrors checks that each error run can meet at start says what
// was wrong and what to do, with the exit status it maps to.
func TestRunStartErrors(t *testing.T) {
	t.Parallel()
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { busy.Close() })
	const noDB = "postgres://postgres@127.0.0.1:1/test?sslmode=disable"

	for _, tc := range []struct {
		name  string
		args  []string
		usage bool     // exit 2, else 1
		want  []string // in the message
	}{
		{"http address without port", []string{"--http-addr", "localhost"}, true,
			[]string{`--http-addr "localhost"`, "use host:port, e.g. :9090"}},
		{"http address in use", []string{"--http-addr", busy.Addr().String()}, false,
			[]string{"serve HTTP on --http-addr " + busy.Addr().String(), "address already in use", "choose a free address"}},
		{"bad metrics schedule", []string{"--metrics-schedule", "often"}, true,
			[]string{`--metrics-schedule "often"`, `"@every 30s"`}},
		{"bad backlog schedule", []string{"--backlog-schedule", "* *"}, true,
			[]string{`--backlog-schedule "* *"`, "cron expression"}},
		{"negative retention", []string{"--retention", "-1h"}, true, []string{"--retention must not be negative"}},
		{"bad stream storage", []string{"--stream-storage", "disk"}, true, []string{`--stream-storage "disk": use file or memory`}},
		{"zero poll interval", []string{"--poll-interval", "0s"}, true, []string{"--poll-interval must be positive"}},
		{"ack timeout past PostgreSQL's timeouts", []string{"--ack-timeout", "300h"}, true, []string{"--ack-timeout must be at most 24h0m0s"}},
		{"leader timeout past PostgreSQL's timeouts", []string{"--leader-timeout", "720h"}, true, []string{"--leader-timeout must be at most 24h0m0s"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var stderr bytes.Buffer
			args := append([]string{"run", "--database-url", noDB, "--backoff-max", "100ms"}, tc.args...)
			err := run(t.Context(), args, io.Discard, &stderr)
			require.Error(t, err)
			require.Equal(t, tc.usage, isUsage(err), "usage error (exit 2) or not (exit 1): %v", err)
			for _, w := range tc.want {
				require.Contains(t, err.Error(), w)
			}
		})
	}
}

func isUsage(err error) bool { return errors.As(err, new(usageError)) }

// Many /readyz requests at once (a probe misconfigured to hammer it, a
// scanner) cost one database connection, not one each: the pool has no
// limit, and a connection per request exhausted PostgreSQL's
// max_connections for every client of the database.
func TestReadyzFloodUsesOneDatabaseConnection(t *testing.T) {
	t.Parallel()
	db, err := openDB(t.Context(), testenv.DatabaseURL())
	require.NoError(t, err)
	t.Cleanup(func() { db.Close() })
	var rd readiness
	rd.db.Store(db)
	nc, _ := testenv.NATS(t)
	rd.nc.Store(nc)
	h := newHTTPHandler(newRegistry(poller.NewMetrics()), &rd, slog.New(slog.DiscardHandler))

	var (
		wg   sync.WaitGroup
		peak atomic.Int64
		done = make(chan struct{})
	)
	go func() {
		for {
			select {
			case <-done:
				return
			default:
			}
			if n := int64(db.Stats().OpenConnections); n > peak.Load() {
				peak.Store(n)
			}
		}
	}()
	for range 30 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 3 {
				code, body := request(t, h, http.MethodGet, pathReadyz)
				require.Equal(t, http.StatusOK, code, body)
			}
		}()
	}
	wg.Wait()
	close(done)
	require.LessOrEqual(t, peak.Load(), int64(2), "database connections open during 90 concurrent /readyz")
}

// A database error that retrying cannot fix (the publisher's role lost a
// privilege, a column it writes was dropped) makes the loop back off for
// ever while the database answers pings: /readyz says so, with the
// SQLSTATE and what to do, and is ready again once it is fixed. An idle
// publisher is ready.
func TestReadyzReportsALastingDatabaseError(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, sqlstate, hint string
		breaks, fixes        string // SQL run as the owner; $role is the role
	}{
		{"role without UPDATE", "42501", "grant the publisher's database role",
			`REVOKE UPDATE ON events FROM $role`, `GRANT UPDATE ON events TO $role`},
		{"dropped column", "42703", "a column or table the publisher uses is missing",
			`ALTER TABLE events DROP COLUMN published_at`, `ALTER TABLE events ADD COLUMN published_at timestamptz`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			owner := testenv.NewDB(t)
			role := "outbox_pub_" + testenv.Suffix()
			owner.MustExec(`CREATE ROLE ` + role + ` LOGIN`)
			t.Cleanup(func() {
				owner.MustExec(`DROP OWNED BY ` + role)
				owner.MustExec(`DROP ROLE ` + role)
			})
			owner.MustExec(`GRANT USAGE ON SCHEMA ` + owner.Schema + ` TO ` + role)
			owner.MustExec(`GRANT SELECT, UPDATE ON events TO ` + role)
			u, err := url.Parse(owner.DSN)
			require.NoError(t, err)
			u.User = url.User(role)
			db, err := sql.Open("postgres", u.String())
			require.NoError(t, err)
			t.Cleanup(func() { db.Close() })

			nc, js := testenv.NATS(t)
			_, prefix := testenv.Stream(t, js)
			var logs testenv.SyncBuffer
			p, err := poller.New(poller.Config{DB: db, DSN: u.String(), NATS: nc, PollInterval: 100 * time.Millisecond,
				BackoffMax: 200 * time.Millisecond, LeaderTimeout: 2 * time.Second,
				Logger: slog.New(slog.NewTextHandler(&logs, nil))})
			require.NoError(t, err)
			var rd readiness
			rd.db.Store(db)
			rd.nc.Store(nc)
			rd.poller.Store(p)
			h := newHTTPHandler(newRegistry(poller.NewMetrics()), &rd, slog.New(slog.DiscardHandler))
			ctx, stop := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- p.Run(ctx) }()
			t.Cleanup(func() { stop(); require.NoError(t, <-done) })

			w, err := outbox.NewWriter(outbox.Config{})
			require.NoError(t, err)
			write := func() {
				tx, err := owner.Beginx()
				require.NoError(t, err)
				_, err = w.Write(context.Background(), tx, outbox.Event{EntityType: "order", EntityID: "1",
					Type: "Changed", Subject: prefix + ".order", Data: json.RawMessage(`{}`)})
				require.NoError(t, err)
				require.NoError(t, tx.Commit())
			}
			write()
			testenv.Eventually(t, 10*time.Second, func() bool { return owner.Count(t, "SUCCESS") == 1 }, "published")
			code, body := request(t, h, http.MethodGet, pathReadyz)
			require.Equal(t, http.StatusOK, code, "an idle publisher is ready: %s", body)
			require.Equal(t, "ok", readyBody(t, body).Loop)

			owner.MustExec(strings.ReplaceAll(tc.breaks, "$role", role))
			write()
			testenv.Eventually(t, 10*time.Second, func() bool {
				code, body = request(t, h, http.MethodGet, pathReadyz)
				return code == http.StatusServiceUnavailable
			}, "/readyz reports the lasting error (logs: %s)", &logs)
			r := readyBody(t, body)
			require.Contains(t, r.Loop, "SQLSTATE "+tc.sqlstate)
			require.Contains(t, r.Loop, tc.hint)
			require.Equal(t, "ok", r.Database, "the database answers pings all along")
			require.Contains(t, logs.String(), "sqlstate="+tc.sqlstate)
			require.Contains(t, logs.String(), "hint=")

			owner.MustExec(strings.ReplaceAll(tc.fixes, "$role", role))
			testenv.Eventually(t, 10*time.Second, func() bool { return owner.Count(t, "SUCCESS") == 2 },
				"published once fixed (logs: %s)", &logs)
			testenv.Eventually(t, 10*time.Second, func() bool {
				code, body = request(t, h, http.MethodGet, pathReadyz)
				return code == http.StatusOK
			}, "ready again once fixed: %s", &body)
		})
	}
}
