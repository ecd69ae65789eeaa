package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/pkg/outbox"
)

// streamMsg is one message read back from a stream.
type streamMsg struct {
	msgID   string // Nats-Msg-Id
	eventID string // outbox event id header
	entity  string // entity id header
	replay  string // Outbox-Replay header: the replay's run id, or empty
	data    payload
}

// readStream reads every message of the stream, in stream order, with an
// ordered consumer. A read that fails (on a cluster, a consumer just made
// may not answer yet: "no responders") starts again, for up to 20 s.
func readStream(t *testing.T, js jetstream.JetStream, stream string) []streamMsg {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		out, err := tryReadStream(js, stream)
		if err == nil || time.Now().After(deadline) {
			require.NoError(t, err)
			return out
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func tryReadStream(js jetstream.JetStream, stream string) ([]streamMsg, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return nil, err
	}
	info, err := s.Info(ctx)
	if err != nil {
		return nil, err
	}
	want := int(info.State.Msgs)
	cons, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	if err != nil {
		return nil, err
	}
	out := make([]streamMsg, 0, want)
	for len(out) < want {
		batch, err := cons.Fetch(min(500, want-len(out)), jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			return nil, err
		}
		got := 0
		for m := range batch.Messages() {
			got++
			h := m.Headers()
			sm := streamMsg{msgID: h.Get(jetstream.MsgIDHeader), eventID: h.Get(outbox.HeaderEventID),
				entity: h.Get(outbox.HeaderEntityID), replay: h.Get(outbox.HeaderReplay)}
			if err := json.Unmarshal(m.Data(), &sm.data); err != nil {
				return nil, fmt.Errorf("payload of %s: %w", sm.msgID, err)
			}
			out = append(out, sm)
		}
		if err := batch.Error(); err != nil {
			return nil, err
		}
		if got == 0 {
			return nil, fmt.Errorf("stream %s: read %d of %d messages, then nothing", stream, len(out), want)
		}
	}
	return out, nil
}

// entitySequences returns, per entity, the numbers of its events in stream
// order, counting each event id once (its first copy).
func entitySequences(msgs []streamMsg) map[string][]int {
	seen := map[string]bool{}
	out := map[string][]int{}
	for _, m := range msgs {
		if seen[m.eventID] {
			continue
		}
		seen[m.eventID] = true
		out[m.data.Entity] = append(out[m.data.Entity], m.data.N)
	}
	return out
}

// requireInOrder checks that each entity's events are in the stream in
// write order and complete: entity e's first copies read 1, 2, ...,
// want[e], and no other entity is there.
func requireInOrder(t *testing.T, msgs []streamMsg, want map[string]int) {
	t.Helper()
	got := entitySequences(msgs)
	for e, n := range want {
		require.Equal(t, upTo(n), got[e], "events of entity %s in stream order", e)
	}
	require.Len(t, got, len(want), "entities in the stream")
}

// upTo returns 1..n.
func upTo(n int) []int {
	s := make([]int, n)
	for i := range s {
		s[i] = i + 1
	}
	return s
}

// requireEachOnce checks that the stream holds exactly the events ids, each
// once (the duplicate window dropped re-sends), with Nats-Msg-Id equal to
// the event id.
func requireEachOnce(t *testing.T, msgs []streamMsg, ids []string) {
	t.Helper()
	unique := map[string]int{}
	for _, m := range msgs {
		require.Equal(t, m.eventID, m.msgID, "Nats-Msg-Id is the event id")
		require.Equal(t, m.data.Entity, m.entity, "entity header matches the payload")
		unique[m.msgID]++
	}
	for id, n := range unique {
		require.Equal(t, 1, n, "event %s is in the stream %d times", id, n)
	}
	require.Len(t, unique, len(ids), "distinct events in the stream")
	for _, id := range ids {
		require.Contains(t, unique, id, "event %s never reached the stream", id)
	}
}
