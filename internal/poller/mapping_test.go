package poller_test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// An account subject mapping (here the deterministic partitioning NATS
// recommends for ordered, partitioned consumption) sends a subject to a
// stream whose filters do not name it: JetStream stores such events, so the
// publisher must publish them, not refuse them for want of a stream. Each
// entity alternates mapped and directly covered subjects: the first mapped
// message is sent synchronously, in the middle of the asynchronous batch,
// the later ones asynchronously, and each entity's events reach the stream
// in order. A subject mapped to no stream is still refused ("no
// responders") and ends FAILED.
func TestMappedSubjectsArePublished(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	conf := filepath.Join(dir, "nats.conf")
	require.NoError(t, os.WriteFile(conf, []byte(fmt.Sprintf(`
jetstream { store_dir: %q }
accounts { A { jetstream: enabled, users: [{user: u, password: p}],
	mappings: { "order.*.changed": "parts.{{partition(3,1)}}.order.{{wildcard(1)}}.changed",
		"lost.*": "nowhere.{{wildcard(1)}}" } } }
no_auth_user: u
`, dir)), 0o600))
	opts, err := server.ProcessConfigFile(conf)
	require.NoError(t, err)
	srv := testenv.StartNATSServer(t, opts)
	nc, js := srv.Connect(t)
	b := newBundle(t, nc, js)
	b.createStream(t, jetstream.StreamConfig{Subjects: []string{"parts.>"}, Storage: jetstream.MemoryStorage})
	var events []outbox.Event
	for n := range 4 {
		for i := range 3 {
			subject := fmt.Sprintf("order.%d.changed", i)
			if n%2 == 1 {
				subject = fmt.Sprintf("parts.direct.%d", i)
			}
			events = append(events, outbox.Event{EntityType: "order", EntityID: fmt.Sprint(i), Type: "Changed",
				Subject: subject, Data: json.RawMessage(`{}`)})
		}
	}
	events = append(events, outbox.Event{EntityType: "order", EntityID: "lost", Type: "Changed",
		Subject: "lost.x", Data: json.RawMessage(`{}`)})
	b.write(t, events...)
	b.start(t, fastConfig())
	testenv.Eventually(t, 15*time.Second, func() bool {
		return b.db.Count(t, "SUCCESS")+b.db.Count(t, "FAILED") == 13
	}, "every event published or FAILED")
	var lastError string
	require.NoError(t, b.db.Get(&lastError, `SELECT coalesce(max(last_error), '') FROM events WHERE entity_id <> 'lost'`))
	require.Equal(t, 12, b.db.Count(t, "SUCCESS"), "last_error: %s", lastError)
	require.NoError(t, b.db.Get(&lastError, `SELECT coalesce(max(last_error), '') FROM events WHERE entity_id = 'lost'`))
	require.Contains(t, lastError, "no responders")
	requireOnceInOrder(t, b.received(t), 12)
}

// A subject mapped to a stream that never acknowledges (no_ack) gets no
// PubAck: that is the event's refusal, not an outage, so it ends FAILED
// instead of holding the loop, and the batch waits for such an answer once
// (the second entity's event is left for a later batch, not sent behind
// the first). Events on covered subjects flow meanwhile.
func TestMappedSubjectWithoutAckIsRefused(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	conf := filepath.Join(dir, "nats.conf")
	require.NoError(t, os.WriteFile(conf, []byte(fmt.Sprintf(`
jetstream { store_dir: %q }
accounts { A { jetstream: enabled, users: [{user: u, password: p}],
	mappings: { "quiet.*": "mute.{{wildcard(1)}}" } } }
no_auth_user: u
`, dir)), 0o600))
	opts, err := server.ProcessConfigFile(conf)
	require.NoError(t, err)
	srv := testenv.StartNATSServer(t, opts)
	nc, js := srv.Connect(t)
	b := newBundle(t, nc, js)
	b.createStream(t, jetstream.StreamConfig{Subjects: []string{"mute.>"}, NoAck: true, Storage: jetstream.MemoryStorage})
	b.createStream(t, jetstream.StreamConfig{Name: "LOUD", Subjects: []string{"loud.>"}, Storage: jetstream.MemoryStorage})
	b.write(t,
		outbox.Event{EntityType: "order", EntityID: "a", Type: "Changed", Subject: "quiet.a", Data: json.RawMessage(`{}`)},
		outbox.Event{EntityType: "order", EntityID: "b", Type: "Changed", Subject: "quiet.b", Data: json.RawMessage(`{}`)},
		outbox.Event{EntityType: "order", EntityID: "c", Type: "Changed", Subject: "loud.c", Data: json.RawMessage(`{}`)})
	cfg := fastConfig()
	cfg.AckTimeout = time.Second
	cfg.MaxAttempts = 2
	b.start(t, cfg)
	testenv.Eventually(t, 40*time.Second, func() bool { return b.db.Count(t, "FAILED") == 2 }, "both mapped events FAILED")
	require.Equal(t, 1, b.db.Count(t, "SUCCESS"))
	var lastError string
	require.NoError(t, b.db.Get(&lastError, `SELECT coalesce(min(last_error), '') FROM events WHERE event_status = 'FAILED'`))
	require.Contains(t, lastError, "no PubAck")
}
