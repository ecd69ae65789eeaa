package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// frames collects what status --watch writes and cancels the command after
// n writes (one write a refresh).
type frames struct {
	mu     sync.Mutex
	n      int
	cancel context.CancelFunc
	got    []string
}

func (f *frames) Write(p []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.got = append(f.got, string(p))
	if len(f.got) == f.n {
		f.cancel()
	}
	return len(p), nil
}

// watch runs status with args until it has written n refreshes.
func watch(t *testing.T, n int, args ...string) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out := &frames{n: n, cancel: cancel}
	var stderr bytes.Buffer
	require.NoError(t, run(ctx, append([]string{"status", "--watch"}, args...), out, &stderr), stderr.String())
	require.Len(t, out.got, n, "stops once the context ends")
	return out.got
}

// statusDB is a schema with 2 READY events, one of them blocked behind a
// FAILED one.
func statusDB(t *testing.T) *testenv.DB {
	t.Helper()
	db := testenv.NewDB(t)
	w, err := outbox.NewWriter(outbox.Config{})
	require.NoError(t, err)
	tx, err := db.Beginx()
	require.NoError(t, err)
	_, err = w.Write(t.Context(), tx,
		outbox.Event{EntityType: "order", EntityID: "a", Type: "Created", Data: 1},
		outbox.Event{EntityType: "order", EntityID: "b", Type: "Created", Data: 1},
		outbox.Event{EntityType: "order", EntityID: "b", Type: "Paid", Data: 1})
	require.NoError(t, err)
	require.NoError(t, tx.Commit())
	db.MustExec(`UPDATE events SET event_status = 'FAILED', attempts = 1, last_error = 'no stream' WHERE seq = 2`)
	return db
}

func TestStatusWatch(t *testing.T) {
	t.Parallel()
	db := statusDB(t)

	t.Run("plain blocks when not a terminal", func(t *testing.T) {
		t.Parallel()
		got := watch(t, 3, "--interval", "10ms", "--database-url", db.DSN)
		for i, f := range got {
			require.NotContains(t, f, clearScreen, "no escape codes in a pipe")
			require.Regexp(t, `^status at \S+ \(every 10ms, Ctrl-C to stop\)\n\n`, f, "block %d", i)
			require.Regexp(t, `(?m)^READY\s+2\s`, f)
			require.Regexp(t, `(?m)^FAILED\s+1$`, f)
			require.Regexp(t, `(?m)^order/b\s+\S+\s+FAILED\s+1\s+1\s+no stream$`, f, "blocked entity and the event blocking it")
			require.True(t, strings.HasSuffix(f, "\n\n"), "blocks are separated by a blank line")
		}
	})

	t.Run("json: one object a line", func(t *testing.T) {
		t.Parallel()
		got := watch(t, 2, "--json", "--interval", "10ms", "--database-url", db.DSN)
		for _, f := range got {
			require.Equal(t, 1, strings.Count(f, "\n"), "one line: %q", f)
			var st poller.Status
			require.NoError(t, json.Unmarshal([]byte(f), &st))
			require.Equal(t, map[string]int{"READY": 2, "SUCCESS": 0, "FAILED": 1}, st.Counts)
			require.Equal(t, 1, st.BlockedTotal)
		}
	})

	t.Run("bad interval is a usage error", func(t *testing.T) {
		t.Parallel()
		err := run(t.Context(), []string{"status", "--watch", "--interval", "0s"}, &bytes.Buffer{}, &bytes.Buffer{})
		require.ErrorAs(t, err, new(usageError))
		require.ErrorContains(t, err, "--interval must be positive")
	})
}

func TestWatchStatusOnATerminal(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	out := &frames{n: 3, cancel: cancel}
	reads := 0
	read := func(context.Context) (*poller.Status, error) {
		reads++
		if reads == 2 {
			return nil, errors.New("connection refused")
		}
		return &poller.Status{Table: "events", Counts: map[string]int{"READY": reads}}, nil
	}
	var stderr bytes.Buffer
	require.NoError(t, watchStatus(ctx, out, &stderr, watchOptions{every: time.Millisecond, tty: true}, read))
	require.Len(t, out.got, 3)
	for _, f := range out.got {
		require.True(t, strings.HasPrefix(f, clearScreen), "each refresh redraws the screen: %q", f)
	}
	require.Regexp(t, `(?m)^READY\s+1\s`, out.got[0])
	require.Contains(t, out.got[1], "could not read the status: connection refused", "an error is shown in place")
	require.Regexp(t, `(?m)^READY\s+3\s`, out.got[2], "and the watch goes on")
}
