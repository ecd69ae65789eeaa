package main

import (
	"bytes"
	"context"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/internal/testenv"
)

// publisher pause and resume set the switch that status shows, and a
// running publisher reports it on /readyz (still ready) and as a gauge.
func TestPauseAndResumeCommands(t *testing.T) {
	t.Parallel()
	db := statusDB(t)
	nc, _ := testenv.NATS(t)
	m := poller.NewMetrics()
	p, err := poller.New(poller.Config{DB: db.DB.DB, DSN: db.DSN, NATS: nc, PollInterval: 100 * time.Millisecond,
		LeaderTimeout: 2 * time.Second, Metrics: m, Logger: slog.New(slog.DiscardHandler)})
	require.NoError(t, err)
	var rd readiness
	rd.db.Store(db.DB.DB)
	rd.nc.Store(nc)
	rd.poller.Store(p)
	h := newHTTPHandler(newRegistry(m), &rd, slog.New(slog.DiscardHandler))
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	t.Cleanup(func() { stop(); require.NoError(t, <-done) })

	cli := func(args ...string) string {
		t.Helper()
		var out, errOut bytes.Buffer
		require.NoError(t, run(t.Context(), append(args, "--database-url", db.DSN), &out, &errOut), errOut.String())
		return out.String()
	}
	require.Regexp(t, `(?m)^publishing\s+active$`, cli("status"))

	require.Contains(t, cli("pause", "--by", "carol"), "publishing paused by carol")
	require.Regexp(t, `(?m)^publishing\s+PAUSED by carol since \S+ \('publisher resume' resumes\)$`, cli("status"))
	testenv.Eventually(t, 10*time.Second, func() bool {
		code, body := request(t, h, http.MethodGet, pathReadyz)
		r := readyBody(t, body)
		return code == http.StatusOK && r.Paused && r.PausedBy == "carol"
	}, "/readyz shows the pause and stays ready")
	require.Equal(t, 1.0, testutil.ToFloat64(m.Paused))

	require.Contains(t, cli("resume", "--by", "dave"), "publishing resumed by dave")
	require.Regexp(t, `(?m)^publishing\s+active$`, cli("status"))
	testenv.Eventually(t, 10*time.Second, func() bool {
		code, body := request(t, h, http.MethodGet, pathReadyz)
		return code == http.StatusOK && !readyBody(t, body).Paused
	}, "/readyz shows the resume")
	require.Equal(t, 0.0, testutil.ToFloat64(m.Paused))
}

func TestPauseCommandUsage(t *testing.T) {
	t.Parallel()
	var out bytes.Buffer
	err := run(t.Context(), []string{"pause", "--help"}, &out, &bytes.Buffer{})
	require.ErrorIs(t, err, errHelp)
	require.Contains(t, out.String(), "Pause publishing")
	out.Reset()
	require.ErrorIs(t, run(t.Context(), []string{"resume", "--help"}, &out, &bytes.Buffer{}), errHelp)
	require.Contains(t, out.String(), "Resume publishing")
	err = run(t.Context(), []string{"pause", "--bogus"}, &bytes.Buffer{}, &bytes.Buffer{})
	require.ErrorAs(t, err, new(usageError))
	out.Reset()
	require.ErrorIs(t, run(t.Context(), []string{"help"}, &out, &bytes.Buffer{}), errHelp)
	require.True(t, strings.Contains(out.String(), "  pause ") && strings.Contains(out.String(), "  resume "), out.String())
}
