package integration

import (
	"maps"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// TestPoisonEvents runs the publisher on a table holding, among normal
// events, one whose subject no stream covers and one too large for its
// stream. The normal events are published; the two poison events are
// FAILED with their reasons shown by `status`, and hold back the later
// events of their entities. Once the missing stream exists, `requeue --all`
// gets the first one and the events behind it published, in order; the
// too-large one fails again and its entity stays blocked.
func TestPoisonEvents(t *testing.T) {
	t.Parallel()
	_, js := testenv.NATS(t)
	prefix := "t" + testenv.Suffix()
	stream := createStream(t, js, jetstream.StreamConfig{
		Subjects: []string{prefix + ".>"}, Duplicates: 2 * time.Minute, MaxMsgSize: 1024,
	})
	b := newBundle(t, js, stream, prefix)
	ghostPrefix := "g" + testenv.Suffix() // no stream yet
	ghostSubject := ghostPrefix + ".ghost.created"

	normal := b.seqWriter(prefix+".order.updated", entityNames("e", 10), 1)
	ghost := b.seqWriter(ghostSubject, []string{"ghost"}, 2)
	big := b.seqWriter(prefix+".order.updated", []string{"big"}, 3)
	ctx := t.Context()
	write := func(s *seqWriter, events ...outbox.Event) {
		t.Helper()
		require.NoError(t, s.commit(ctx, events...))
	}
	require.NoError(t, normal.write(ctx, 50, 5))
	write(big, big.event("big"))
	write(ghost, ghost.event("ghost"))
	require.NoError(t, normal.write(ctx, 50, 5))
	tooLarge := big.event("big")
	tooLarge.Data = payload{Entity: "big", N: big.next["big"], Pad: strings.Repeat("x", 2000)}
	write(big, tooLarge)
	write(ghost, ghost.event("ghost"), ghost.event("ghost"))
	require.NoError(t, normal.write(ctx, 50, 5))
	write(big, big.event("big"))
	ghostIDs, bigIDs := b.entityIDs(t, "ghost"), b.entityIDs(t, "big")
	require.Len(t, ghostIDs, 3)
	require.Len(t, bigIDs, 3)

	startPublisher(t, "publisher", b.db.DSN, "--max-attempts", "1", "--retry-base", "100ms")
	testenv.Eventually(t, 30*time.Second, func() bool {
		return b.status(t, ghostIDs[0]) == "FAILED" && b.status(t, bigIDs[1]) == "FAILED" &&
			b.db.Count(t, "SUCCESS") == 151
	}, "expected the 150 normal events and big's first SUCCESS, and both poison events FAILED")
	require.Equal(t, map[string]int{"SUCCESS": 151, "FAILED": 2, "READY": 3}, b.counts(t),
		"ghost's and big's later events wait behind their FAILED events")
	for _, id := range append(ghostIDs[1:], bigIDs[2]) {
		require.Equal(t, "READY", b.status(t, id))
	}

	r := requireCLI(t, "status", "--database-url", b.db.DSN)
	require.Regexp(t, `(?m)^FAILED\s+2$`, r.stdout)
	require.Regexp(t, `(?m)^blocked entities\s+2$`, r.stdout)
	require.Regexp(t, `(?m)^`+ghostIDs[0]+`\s.*order/ghost\s+1\s+no JetStream stream covers subject "`+regexp.QuoteMeta(ghostSubject)+`"`, r.stdout)
	require.Regexp(t, `(?m)^`+bigIDs[1]+`\s.*order/big\s+1\s+message is \d+ bytes, over stream `+stream+`'s max_msg_size of 1024`, r.stdout)

	ghostStream := createStream(t, js, jetstream.StreamConfig{Subjects: []string{ghostPrefix + ".>"}, Duplicates: 2 * time.Minute})
	r = requireCLI(t, "requeue", "--all", "--database-url", b.db.DSN)
	require.Contains(t, r.stdout, "requeued 2 FAILED events")
	testenv.Eventually(t, 30*time.Second, func() bool {
		return b.status(t, ghostIDs[2]) == "SUCCESS" && b.status(t, bigIDs[1]) == "FAILED"
	}, "after requeue, ghost's events should be published and big's too-large event FAILED again")
	require.Equal(t, map[string]int{"SUCCESS": 154, "FAILED": 1, "READY": 1}, b.counts(t))
	require.Equal(t, "READY", b.status(t, bigIDs[2]), "big stays blocked")

	ghostMsgs := readStream(t, js, ghostStream)
	requireEachOnce(t, ghostMsgs, ghostIDs)
	requireInOrder(t, ghostMsgs, map[string]int{"ghost": 3})

	msgs := readStream(t, js, stream)
	want := maps.Clone(normal.next)
	want["big"] = 1
	requireInOrder(t, msgs, want)
	requireEachOnce(t, msgs, successIn(t, b, prefix))
}

// entityIDs returns the ids of one entity's events in seq order.
func (b *bundle) entityIDs(t *testing.T, entity string) []string {
	t.Helper()
	var ids []string
	require.NoError(t, b.db.Select(&ids, `SELECT event_id::text FROM events WHERE entity_id = $1 ORDER BY seq`, entity))
	return ids
}

// status returns one event's status.
func (b *bundle) status(t *testing.T, id string) string {
	t.Helper()
	var s string
	require.NoError(t, b.db.Get(&s, `SELECT event_status FROM events WHERE event_id = $1`, id))
	return s
}

// successIn returns the ids of SUCCESS events whose subject starts with
// prefix.
func successIn(t *testing.T, b *bundle, prefix string) []string {
	t.Helper()
	var ids []string
	require.NoError(t, b.db.Select(&ids, `SELECT event_id::text FROM events
		WHERE event_status = 'SUCCESS' AND starts_with(event_target, $1 || '.') ORDER BY seq`, prefix))
	return ids
}
