package main

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// When the server closes the publisher's connection for good (here for a
// protocol line over max_control_line, which nats.go never reconnects
// after), the binary connects again and publishes what was written
// meanwhile; /readyz and /healthz say so while the connection is gone.
func TestRunPollerConnectsAgainAfterServerClose(t *testing.T) {
	t.Parallel()
	t.Run("single leader", func(t *testing.T) { t.Parallel(); connectsAgain(t, poller.Config{}) })
	// The new Poller takes the replica id's lock the old one held.
	t.Run("partitioned", func(t *testing.T) {
		t.Parallel()
		connectsAgain(t, poller.Config{Partitions: 4, ReplicaID: "r1"})
	})
}

func connectsAgain(t *testing.T, cfg poller.Config) {
	srv := testenv.StartNATSServer(t, nil)
	db := testenv.NewDB(t)
	log := testLog(t)
	_, js := srv.Connect(t)
	prefix := "p" + testenv.Suffix()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	stream, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: strings.ToUpper(prefix),
		Subjects: []string{prefix + ".>"}, Storage: jetstream.MemoryStorage})
	cancel()
	require.NoError(t, err)

	var (
		mu    sync.Mutex
		conns []*nats.Conn
	)
	connect := func() (*nats.Conn, error) {
		nc, err := connectNATS(natsOptions{url: srv.URL()}, true, log, nil)
		if err == nil {
			mu.Lock()
			conns = append(conns, nc)
			mu.Unlock()
		}
		return nc, err
	}
	last := func() *nats.Conn {
		mu.Lock()
		defer mu.Unlock()
		return conns[len(conns)-1]
	}
	nc, err := connect()
	require.NoError(t, err)
	var ready readiness
	ready.db.Store(db.DB.DB)
	ready.nc.Store(nc)
	cfg.DB, cfg.DSN, cfg.NATS, cfg.Logger = db.DB.DB, db.DSN, nc, log
	cfg.PollInterval, cfg.BackoffMax, cfg.LeaderTimeout = 100*time.Millisecond, 500*time.Millisecond, 2*time.Second
	p, err := poller.New(cfg)
	require.NoError(t, err)
	runCtx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- runPoller(runCtx, p, cfg, &ready, log, connect) }()
	t.Cleanup(func() {
		stop()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(30 * time.Second):
			t.Error("runPoller did not return")
		}
		mu.Lock()
		defer mu.Unlock()
		for _, nc := range conns {
			nc.Close()
		}
	})

	w, err := outbox.NewWriter(outbox.Config{})
	require.NoError(t, err)
	write := func(n int) {
		tx, err := db.Beginx()
		require.NoError(t, err)
		for i := range n {
			_, err = w.Write(context.Background(), tx, outbox.Event{EntityType: "order", EntityID: "1", Type: "Changed",
				Subject: prefix + ".order", Data: json.RawMessage(`{"n":` + strconv.Itoa(i) + `}`)})
			require.NoError(t, err)
		}
		require.NoError(t, tx.Commit())
	}
	write(3)
	testenv.Eventually(t, 10*time.Second, func() bool { return db.Count(t, "SUCCESS") == 3 }, "3 events SUCCESS")

	h := newHTTPHandler(newRegistry(poller.NewMetrics()), &ready, log)
	// Closed again and again: each new connection and Poller takes over.
	for round := range 3 {
		cur := last()
		require.NoError(t, cur.Publish("bh01."+strings.Repeat("a", 5000), nil))
		testenv.Eventually(t, 10*time.Second, cur.IsClosed, "the server closes the connection")
		write(3)
		testenv.Eventually(t, 15*time.Second, func() bool {
			return db.Count(t, "SUCCESS") == 6+3*round && last() != cur && ready.nc.Load() == last()
		}, "the events written after the close SUCCESS on a new connection")
	}
	code, body := request(t, h, http.MethodGet, pathReadyz)
	require.Equal(t, http.StatusOK, code, body)
	code, _ = request(t, h, http.MethodGet, pathHealthz)
	require.Equal(t, http.StatusOK, code)

	ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	info, err := stream.Info(ctx)
	require.NoError(t, err)
	require.EqualValues(t, 6+3*2, info.State.Msgs, "each event once")
}

// testLog logs to the test's output.
func testLog(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tlog{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tlog struct{ t *testing.T }

func (w tlog) Write(p []byte) (int, error) { w.t.Log(strings.TrimSpace(string(p))); return len(p), nil }
