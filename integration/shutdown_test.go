package integration

import (
	"context"
	"regexp"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
)

// TestSIGTERMUnderLoad stops the publisher with SIGTERM while it drains a
// backlog and writers keep adding to it: it finishes the batch in flight and
// exits 0. Every event it marked SUCCESS is in the stream, none is FAILED,
// and a new publisher drains the rest.
func TestSIGTERMUnderLoad(t *testing.T) {
	t.Parallel()
	b := setup(t)
	w := b.writeAll(t, entityNames("e", 30), 2000)

	p := startPublisher(t, "publisher", b.db.DSN, "--batch-size", "50")
	testenv.Eventually(t, 30*time.Second, func() bool { return b.db.Count(t, "SUCCESS") >= 200 },
		"the publisher never published 200 events")

	// Keep writing while the publisher stops.
	var stop atomic.Bool
	defer stop.Store(true)
	writeErr := make(chan error, 1)
	go func() {
		for !stop.Load() {
			if err := w.write(context.Background(), 20, 5); err != nil {
				writeErr <- err
				return
			}
		}
		writeErr <- nil
	}()
	p.Term()
	code := p.Wait(t, 30*time.Second)
	stop.Store(true)
	require.NoError(t, <-writeErr)
	require.Zero(t, code, "exit status after SIGTERM")
	require.Contains(t, p.Logs(), logStopped)

	// Written events are either published or still waiting; what the
	// stopped publisher marked SUCCESS reached the stream.
	total := b.db.Int(t, `SELECT count(*) FROM events`)
	require.Equal(t, w.written(), total)
	c := b.counts(t)
	require.Zero(t, c["FAILED"])
	require.Equal(t, total, c["SUCCESS"]+c["READY"], "counts %v", c)
	inStream := map[string]bool{}
	for _, m := range readStream(t, b.js, b.stream) {
		inStream[m.eventID] = true
	}
	for _, id := range b.db.IDs(t, "SUCCESS") {
		require.True(t, inStream[id], "event %s is SUCCESS but not in the stream", id)
	}
	t.Logf("at SIGTERM exit: %d SUCCESS, %d READY", c["SUCCESS"], c["READY"])

	// "SIGTERM: stop claiming, finish in-flight acks, mark, exit 0": what
	// the stopping publisher sent, it marked. (A claim transaction begun
	// with Run's context was rolled back by the stop, leaving the batch in
	// flight published but READY.)
	require.NotRegexp(t, markFailed, p.Logs(), "the batch in flight at SIGTERM was not marked")
	for _, id := range b.db.IDs(t, "READY") {
		require.False(t, inStream[id], "event %s was published before the exit but left READY", id)
	}

	p2 := startPublisher(t, "publisher 2", b.db.DSN)
	b.waitAllSuccess(t, total, 60*time.Second)
	p2.Term()
	require.Zero(t, p2.Wait(t, 30*time.Second))

	msgs := readStream(t, b.js, b.stream)
	requireEachOnce(t, msgs, b.db.IDs(t, ""))
	requireInOrder(t, msgs, w.next)
}

// markFailed matches the log of a batch whose mark failed.
var markFailed = regexp.MustCompile(`msg="publish loop backing off" err="(mark|commit batch)`)
