package poller_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// A MaxAttempts far above the retry delay's growth (here 1100) must not
// break the mark: the delay's exponent is capped, so refusals keep being
// recorded.
func TestRetryDelayDoesNotOverflowForLargeAttempts(t *testing.T) {
	t.Parallel()
	b := setup(t)
	b.write(t, changes("p"+testenv.Suffix()+".unroutable", 1, 1)...)
	_, err := b.db.Exec(`UPDATE events SET attempts = 1050`)
	require.NoError(t, err)
	cfg := fastConfig()
	cfg.MaxAttempts = 1100
	b.start(t, cfg)

	testenv.Eventually(t, 15*time.Second, func() bool {
		return b.db.Int(t, `SELECT attempts FROM events`) >= 1052
	}, "two more refusals recorded")
	require.Equal(t, 1, b.db.Int(t, `SELECT count(*) FROM events
		WHERE event_status = 'READY' AND available_at <= now() + $1 * interval '1 millisecond'`,
		cfg.RetryMax.Milliseconds()), "the retry time is at most RetryMax away")
}

// responder answers, in place of JetStream, every publish to its subject
// with a JetStream API error code after a delay, once armed.
type responder struct {
	b      *bundle
	stream jetstream.Stream
	reply  []byte
	delay  time.Duration
	sub    *nats.Subscription
}

// jsResponder creates a stream covering subject, for a responder that
// answers with code after delay. The publisher must learn of the stream
// (warmUp) before arm, so that it sends to subject as to any stream.
func (b *bundle) jsResponder(t *testing.T, subject string, code jetstream.ErrorCode, delay time.Duration) *responder {
	t.Helper()
	stored := b.stream
	stream := b.createStream(t, jetstream.StreamConfig{Subjects: []string{subject},
		Storage: jetstream.MemoryStorage, Duplicates: 2 * time.Minute})
	b.stream = stored
	reply, err := json.Marshal(map[string]any{"error": map[string]any{
		"code": 503, "err_code": code, "description": "injected by the test"}})
	require.NoError(t, err)
	return &responder{b: b, stream: stream, reply: reply, delay: delay}
}

// arm makes the stream stop acknowledging (NoAck, which the publisher,
// holding the stream list it read before, does not know) and the
// responder answer in its place, until disarm or the end of the test.
func (r *responder) arm(t *testing.T) {
	t.Helper()
	r.setNoAck(t, true)
	sub, err := r.b.nc.Subscribe(r.stream.CachedInfo().Config.Subjects[0], func(m *nats.Msg) {
		time.AfterFunc(r.delay, func() { _ = m.Respond(r.reply) })
	})
	require.NoError(t, err)
	r.sub = sub
	t.Cleanup(func() { _ = sub.Unsubscribe() })
}

// disarm lets the stream answer again.
func (r *responder) disarm(t *testing.T) {
	t.Helper()
	require.NoError(t, r.sub.Unsubscribe())
	r.setNoAck(t, false)
}

func (r *responder) setNoAck(t *testing.T, on bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sc := r.stream.CachedInfo().Config
	sc.NoAck = on
	_, err := r.b.js.UpdateStream(ctx, sc)
	require.NoError(t, err)
}

// warmUp publishes one event through the running publisher, which reads
// the stream list on the way.
func (b *bundle) warmUp(t *testing.T) {
	t.Helper()
	before := b.db.Count(t, "SUCCESS")
	b.write(t, outbox.Event{EntityType: "warmup", EntityID: "0", Type: "Created", Subject: b.prefix + ".warmup", Data: map[string]int{}})
	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") > before }, "warm-up event SUCCESS")
}

// A refused event's retry time counts from the refusal, not from the start
// of the claim transaction: a refusal that arrives 2s after the send
// (JetStream answering late) still waits RetryBase before the next try.
func TestRetryTimeCountsFromTheRefusal(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cfg := fastConfig()
	cfg.AckTimeout = 5 * time.Second
	cfg.RetryBase, cfg.RetryMax = 10*time.Second, 10*time.Second
	const late = 2 * time.Second
	subject := "p" + testenv.Suffix() + ".order.late"
	r := b.jsResponder(t, subject, 10071, late) // wrong last sequence: a refusal
	b.start(t, cfg)
	b.warmUp(t)
	r.arm(t)

	b.write(t, changes(subject, 1, 1)...)
	testenv.Eventually(t, 15*time.Second, func() bool {
		return b.db.Int(t, `SELECT count(*) FROM events WHERE attempts = 1`) == 1
	}, "the refusal recorded")
	require.Equal(t, 1, b.db.Int(t, `SELECT count(*) FROM events WHERE attempts = 1
		AND available_at >= created_at + $1 * interval '1 millisecond'`, (late+cfg.RetryBase).Milliseconds()),
		"the retry time must count RetryBase from the refusal, %s after the send", late)
}

// A JetStream error code the loop does not know as a refusal of the message
// (here 10008, JetStream temporarily unavailable) is an outage: the loop
// backs off and the events keep their attempts, then go out once JetStream
// stores again.
func TestUnknownJetStreamErrorIsAnOutage(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cfg := fastConfig()
	subject := "p" + testenv.Suffix() + ".order.unavailable"
	r := b.jsResponder(t, subject, 10008, 0) // JetStream temporarily unavailable
	// The loop reads the stream list again before claiming after an
	// outage, and would then see the stream's NoAck: the next try comes
	// after a back-off of at least 1s, time enough to look and disarm.
	cfg.BackoffMin, cfg.BackoffMax = 2*time.Second, 2*time.Second
	p := b.start(t, cfg)
	b.warmUp(t)
	r.arm(t)

	events := changes(subject, 3, 2)
	b.write(t, events...)
	testenv.Eventually(t, 15*time.Second, func() bool { return p.Stats().Backoffs >= 1 }, "the loop backs off")
	require.Zero(t, b.db.Int(t, `SELECT count(*) FROM events WHERE attempts > 0`), "an outage must not burn attempts")
	require.Zero(t, b.db.Count(t, "FAILED"))

	r.disarm(t) // JetStream answers itself again
	testenv.Eventually(t, 15*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(events)+1 },
		"every event SUCCESS once JetStream acks again")
	b.stream = r.stream
	requireOnceInOrder(t, b.received(t), len(events))
}
