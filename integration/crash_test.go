package integration

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
)

// TestSIGKILLMidStream kills the publisher with SIGKILL four times while it
// drains a backlog, restarting it each time. A kill between JetStream's
// PubAck and the mark leaves published rows READY, so they are sent again:
// the stream's duplicate window must drop those re-sends. In the end every
// event is SUCCESS and in the stream exactly once, in order per entity.
func TestSIGKILLMidStream(t *testing.T) {
	t.Parallel()
	b := setup(t)
	const total = 3000
	w := b.writeAll(t, entityNames("e", 40), total)

	// Small batches, so the kills land between batches and inside them.
	flags := []string{"--batch-size", "25"}
	for i, pct := range []int{20, 40, 60, 80} {
		p := startPublisher(t, fmt.Sprintf("publisher %d", i+1), b.db.DSN, flags...)
		testenv.Eventually(t, 60*time.Second, func() bool {
			return b.db.Count(t, "SUCCESS") >= total*pct/100
		}, "SUCCESS count never reached %d%%", pct)
		p.Kill()
		code := p.Wait(t, 10*time.Second)
		require.Equal(t, -1, code, "publisher %d should die of SIGKILL, not exit by itself", i+1)
		t.Logf("killed publisher %d at %d%%: %d SUCCESS", i+1, pct, b.db.Count(t, "SUCCESS"))
	}
	startPublisher(t, "publisher 5", b.db.DSN, flags...)
	b.waitAllSuccess(t, total, 60*time.Second)

	msgs := readStream(t, b.js, b.stream)
	requireEachOnce(t, msgs, b.db.IDs(t, ""))
	requireInOrder(t, msgs, w.next)
}
