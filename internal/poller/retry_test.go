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

// jsResponder answers, in place of JetStream, every publish to subject
// with the API error code after delay, until the test ends. It returns the
// subject's stream: one that covers it (so the publisher sends) but sends
// no acks (NoAck), so the responder's answer is the only one; and the
// responder's subscription.
func (b *bundle) jsResponder(t *testing.T, subject string, code jetstream.ErrorCode, delay time.Duration) (jetstream.Stream, *nats.Subscription) {
	t.Helper()
	stream := b.createStream(t, jetstream.StreamConfig{Subjects: []string{subject}, NoAck: true,
		Storage: jetstream.MemoryStorage, Duplicates: 2 * time.Minute})
	reply, err := json.Marshal(map[string]any{"error": map[string]any{
		"code": 503, "err_code": code, "description": "injected by the test"}})
	require.NoError(t, err)
	sub, err := b.nc.Subscribe(subject, func(m *nats.Msg) {
		time.AfterFunc(delay, func() { _ = m.Respond(reply) })
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	return stream, sub
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
	b.jsResponder(t, subject, 10071, late) // wrong last sequence: a refusal
	b.start(t, cfg)

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
// backs off and the event keeps its attempts, then goes out once JetStream
// stores again.
func TestUnknownJetStreamErrorIsAnOutage(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cfg := fastConfig()
	subject := "p" + testenv.Suffix() + ".order.unavailable"
	stream, sub := b.jsResponder(t, subject, 10008, 0) // JetStream temporarily unavailable
	p := b.start(t, cfg)

	events := changes(subject, 3, 2)
	b.write(t, events...)
	testenv.Eventually(t, 15*time.Second, func() bool { return p.Stats().Backoffs >= int64(cfg.MaxAttempts)+1 },
		"the loop backs off more times than an event has attempts")
	require.Zero(t, b.db.Int(t, `SELECT count(*) FROM events WHERE attempts > 0`), "an outage must not burn attempts")
	require.Zero(t, b.db.Count(t, "FAILED"))

	// JetStream answers itself again.
	require.NoError(t, sub.Unsubscribe())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sc := stream.CachedInfo().Config
	sc.NoAck = false
	_, err := b.js.UpdateStream(ctx, sc)
	require.NoError(t, err)
	testenv.Eventually(t, 15*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(events) },
		"every event SUCCESS once JetStream acks again")
	requireOnceInOrder(t, b.received(t), len(events))
}
