package dedup_test

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/dedup"
	"github.com/pgnats/outbox/pkg/outbox"
)

const consumerName = "billing"

// jsBundle is a test's own database schema, JetStream stream and durable
// pull consumer, with a record of what the consumer saw.
type jsBundle struct {
	bundle
	nc     *nats.Conn
	js     jetstream.JetStream
	stream jetstream.Stream
	prefix string
	cons   jetstream.Consumer

	mu         sync.Mutex
	calls      map[string]int    // handler calls by event id
	deliveries map[uint64]int    // deliveries by stream sequence
	terminated map[uint64]string // term advisories: stream sequence to reason
}

func setupJS(t *testing.T) *jsBundle {
	t.Helper()
	// Longer than the test waits: a message neither acked nor terminated
	// stays pending instead of being redelivered by timeout.
	return setupJSAckWait(t, 5*time.Minute)
}

// setupJSAckWait is setupJS with the consumer's AckWait.
func setupJSAckWait(t *testing.T, ackWait time.Duration) *jsBundle {
	t.Helper()
	b := &jsBundle{
		bundle:     setup(t),
		calls:      map[string]int{},
		deliveries: map[uint64]int{},
		terminated: map[uint64]string{},
	}
	b.nc, b.js = testenv.NATS(t)
	b.stream, b.prefix = testenv.Stream(t, b.js)
	var err error
	b.cons, err = b.stream.CreateOrUpdateConsumer(t.Context(), jetstream.ConsumerConfig{
		Durable:   consumerName,
		AckPolicy: jetstream.AckExplicitPolicy,
		AckWait:   ackWait,
	})
	require.NoError(t, err)

	// The server announces each terminated message on this subject.
	subj := "$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED." + b.stream.CachedInfo().Config.Name + "." + consumerName
	sub, err := b.nc.Subscribe(subj, func(m *nats.Msg) {
		var adv struct {
			StreamSeq uint64 `json:"stream_seq"`
			Reason    string `json:"reason"`
		}
		if json.Unmarshal(m.Data, &adv) == nil {
			b.mu.Lock()
			b.terminated[adv.StreamSeq] = adv.Reason
			b.mu.Unlock()
		}
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	require.NoError(t, b.nc.Flush())
	return b
}

// publish sends a message with the given event id header (none if empty)
// and a unique Nats-Msg-Id, and returns its stream sequence.
func (b *jsBundle) publish(t *testing.T, eventID string) uint64 {
	t.Helper()
	h := nats.Header{}
	h.Set(outbox.HeaderMsgID, testenv.Suffix())
	if eventID != "" {
		h.Set(outbox.HeaderEventID, eventID)
	}
	ack, err := b.js.PublishMsg(t.Context(), &nats.Msg{Subject: b.prefix + ".orders", Header: h, Data: []byte(`{}`)})
	require.NoError(t, err)
	require.False(t, ack.Duplicate, "broker must not drop the message")
	return ack.Sequence
}

// consume runs the dedup handler built from cfg and fn on the consumer,
// recording deliveries and handler calls, until the test ends.
func (b *jsBundle) consume(t *testing.T, cfg dedup.HandlerConfig, fn func(ctx context.Context, tx *sqlx.Tx, msg jetstream.Msg) error) {
	t.Helper()
	cfg.Consumer = consumerName
	h := b.p.Handler(cfg, func(ctx context.Context, tx *sqlx.Tx, msg jetstream.Msg) error {
		b.mu.Lock()
		b.calls[msg.Headers().Get(outbox.HeaderEventID)]++
		b.mu.Unlock()
		return fn(ctx, tx, msg)
	})
	cc, err := b.cons.Consume(func(msg jetstream.Msg) {
		if md, err := msg.Metadata(); err == nil {
			b.mu.Lock()
			b.deliveries[md.Sequence.Stream]++
			b.mu.Unlock()
		}
		h(msg)
	})
	require.NoError(t, err)
	t.Cleanup(func() {
		cc.Stop()
		select {
		case <-cc.Closed():
		case <-time.After(10 * time.Second):
		}
	})
}

// waitSettled waits until every published message was delivered and acked
// or terminated, and cond holds.
func (b *jsBundle) waitSettled(t *testing.T, cond func() bool, msg string) {
	t.Helper()
	testenv.Eventually(t, 15*time.Second, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		info, err := b.cons.Info(ctx)
		require.NoError(t, err)
		return info.NumPending == 0 && info.NumAckPending == 0 && info.NumRedelivered == 0 && cond()
	}, msg)
}

func (b *jsBundle) snapshot() (calls map[string]int, deliveries map[uint64]int, terminated map[uint64]string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	calls, deliveries, terminated = map[string]int{}, map[uint64]int{}, map[uint64]string{}
	for k, v := range b.calls {
		calls[k] = v
	}
	for k, v := range b.deliveries {
		deliveries[k] = v
	}
	for k, v := range b.terminated {
		terminated[k] = v
	}
	return calls, deliveries, terminated
}

// writeEventEffect records the message's event id in the effects table.
func writeEventEffect(ctx context.Context, tx *sqlx.Tx, msg jetstream.Msg) error {
	return writeEffect(ctx, tx, consumerName, msg.Headers().Get(outbox.HeaderEventID))
}

func TestHandler(t *testing.T) {
	t.Parallel()

	t.Run("processes each event once and acks duplicates", func(t *testing.T) {
		t.Parallel()
		b := setupJS(t)
		var seqs []uint64
		for _, id := range []string{"e1", "e2", "e3", "e2"} {
			seqs = append(seqs, b.publish(t, id))
		}
		b.consume(t, dedup.HandlerConfig{}, writeEventEffect)

		b.waitSettled(t, func() bool {
			_, deliveries, _ := b.snapshot()
			return len(deliveries) == len(seqs)
		}, "all messages delivered and acked")
		calls, deliveries, terminated := b.snapshot()
		require.Equal(t, map[string]int{"e1": 1, "e2": 1, "e3": 1}, calls, "handler calls")
		for _, seq := range seqs {
			require.Equal(t, 1, deliveries[seq], "deliveries of stream sequence %d", seq)
		}
		require.Empty(t, terminated)
		for _, id := range []string{"e1", "e2", "e3"} {
			require.Equal(t, 1, b.effects(t, consumerName, id), id)
		}
	})

	t.Run("terminates message without event id", func(t *testing.T) {
		t.Parallel()
		b := setupJS(t)
		bare := b.publish(t, "")
		b.publish(t, "e1")
		b.consume(t, dedup.HandlerConfig{}, writeEventEffect)

		b.waitSettled(t, func() bool {
			_, _, terminated := b.snapshot()
			_, ok := terminated[bare]
			return ok && b.effects(t, consumerName, "e1") == 1
		}, "message without event id terminated and the other processed")
		calls, deliveries, _ := b.snapshot()
		require.Equal(t, map[string]int{"e1": 1}, calls, "handler calls")
		require.Equal(t, 1, deliveries[bare], "deliveries of the message without event id")
	})

	t.Run("redelivers after handler error and then processes once", func(t *testing.T) {
		t.Parallel()
		b := setupJS(t)
		seq := b.publish(t, "e1")
		var failed bool
		b.consume(t, dedup.HandlerConfig{NakDelay: 10 * time.Millisecond}, func(ctx context.Context, tx *sqlx.Tx, msg jetstream.Msg) error {
			if err := writeEventEffect(ctx, tx, msg); err != nil {
				return err
			}
			if !failed { // handler calls for one message are sequential
				failed = true
				return errors.New("inventory service unavailable")
			}
			return nil
		})

		b.waitSettled(t, func() bool {
			return b.effects(t, consumerName, "e1") == 1
		}, "message processed after redelivery")
		calls, deliveries, terminated := b.snapshot()
		require.Equal(t, map[string]int{"e1": 2}, calls, "handler calls")
		require.Equal(t, 2, deliveries[seq], "deliveries")
		require.Empty(t, terminated)
		require.True(t, b.recorded(t, consumerName, "e1"))
	})

	t.Run("terminates message on permanent error", func(t *testing.T) {
		t.Parallel()
		b := setupJS(t)
		bad := b.publish(t, "bad")
		b.publish(t, "e1")
		b.consume(t, dedup.HandlerConfig{NakDelay: 10 * time.Millisecond}, func(ctx context.Context, tx *sqlx.Tx, msg jetstream.Msg) error {
			if err := writeEventEffect(ctx, tx, msg); err != nil {
				return err
			}
			if msg.Headers().Get(outbox.HeaderEventID) == "bad" {
				return dedup.Permanent(errors.New("unknown order"))
			}
			return nil
		})

		b.waitSettled(t, func() bool {
			_, _, terminated := b.snapshot()
			_, ok := terminated[bad]
			return ok && b.effects(t, consumerName, "e1") == 1
		}, "bad message terminated and the other processed")
		calls, deliveries, _ := b.snapshot()
		require.Equal(t, map[string]int{"bad": 1, "e1": 1}, calls, "handler calls")
		require.Equal(t, 1, deliveries[bad], "deliveries of the bad message")
		require.Zero(t, b.effects(t, consumerName, "bad"), "bad message's writes rolled back")
		require.False(t, b.recorded(t, consumerName, "bad"))
	})

	t.Run("panicking handler is nak'd and processed once it stops panicking", func(t *testing.T) {
		t.Parallel()
		b := setupJS(t)
		seq := b.publish(t, "e1")
		var logs testenv.SyncBuffer
		panics := 0
		b.consume(t, dedup.HandlerConfig{NakDelay: 10 * time.Millisecond, Logger: slog.New(slog.NewJSONHandler(&logs, nil))},
			func(ctx context.Context, tx *sqlx.Tx, msg jetstream.Msg) error {
				if err := writeEventEffect(ctx, tx, msg); err != nil {
					return err
				}
				if panics < 2 { // handler calls for one message are sequential
					panics++
					panic("nil map in a handler")
				}
				return nil
			})

		b.waitSettled(t, func() bool {
			return b.effects(t, consumerName, "e1") == 1
		}, "message processed after the handler stopped panicking")
		calls, deliveries, terminated := b.snapshot()
		require.Equal(t, map[string]int{"e1": 3}, calls, "handler calls")
		require.Equal(t, 3, deliveries[seq], "deliveries")
		require.Empty(t, terminated)
		require.Equal(t, 1, b.effects(t, consumerName, "e1"), "effect once")
		require.Equal(t, 2, strings.Count(logs.String(), `"msg":"message processing failed, redelivery requested"`))
		require.Contains(t, logs.String(), "handler panicked: nil map in a handler")
		require.Contains(t, logs.String(), `"stack":"goroutine `, "panic logged with its stack")
	})

	t.Run("nak delay grows with deliveries up to the cap", func(t *testing.T) {
		t.Parallel()
		for _, tc := range []struct {
			name string
			cfg  dedup.HandlerConfig
			want []time.Duration
		}{
			{
				name: "default cap",
				cfg:  dedup.HandlerConfig{NakDelay: 5 * time.Millisecond},
				want: []time.Duration{5, 10, 20, 40, 80},
			},
			{
				name: "cap 20ms",
				cfg:  dedup.HandlerConfig{NakDelay: 5 * time.Millisecond, MaxNakDelay: 20 * time.Millisecond},
				want: []time.Duration{5, 10, 20, 20, 20},
			},
		} {
			t.Run(tc.name, func(t *testing.T) {
				t.Parallel()
				b := setupJS(t)
				b.publish(t, "e1")
				var logs testenv.SyncBuffer
				tc.cfg.Logger = slog.New(slog.NewJSONHandler(&logs, nil))
				failures := 0
				b.consume(t, tc.cfg, func(ctx context.Context, tx *sqlx.Tx, msg jetstream.Msg) error {
					if failures < len(tc.want) {
						failures++
						return errors.New("database unavailable")
					}
					return writeEventEffect(ctx, tx, msg)
				})
				b.waitSettled(t, func() bool {
					return b.effects(t, consumerName, "e1") == 1
				}, "message processed after the failures")

				delays := map[int]time.Duration{} // by delivery count
				for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
					var rec struct {
						Msg        string        `json:"msg"`
						Deliveries int           `json:"deliveries"`
						Delay      time.Duration `json:"delay"`
					}
					require.NoError(t, json.Unmarshal([]byte(line), &rec), line)
					if rec.Msg == "message processing failed, redelivery requested" {
						delays[rec.Deliveries] = rec.Delay
					}
				}
				want := map[int]time.Duration{}
				for i, d := range tc.want {
					want[i+1] = d * time.Millisecond
				}
				require.Equal(t, want, delays, "nak delay by delivery count")
			})
		}
	})

	t.Run("handler slower than AckWait is kept in progress, not redelivered", func(t *testing.T) {
		t.Parallel()
		b := setupJSAckWait(t, time.Second)
		seq := b.publish(t, "e1")
		b.consume(t, dedup.HandlerConfig{InProgressInterval: 200 * time.Millisecond},
			func(ctx context.Context, tx *sqlx.Tx, msg jetstream.Msg) error {
				// The work takes three AckWaits.
				select {
				case <-time.After(3 * time.Second):
				case <-ctx.Done():
					return ctx.Err()
				}
				return writeEventEffect(ctx, tx, msg)
			})

		b.waitSettled(t, func() bool {
			return b.effects(t, consumerName, "e1") == 1
		}, "slow message processed")
		calls, deliveries, terminated := b.snapshot()
		require.Equal(t, map[string]int{"e1": 1}, calls, "handler calls")
		require.Equal(t, 1, deliveries[seq], "deliveries: none while the handler ran")
		require.Empty(t, terminated)
	})

	t.Run("handler hung past Timeout is no longer kept in progress", func(t *testing.T) {
		t.Parallel()
		b := setupJSAckWait(t, time.Second)
		b.publish(t, "e1")
		release := make(chan struct{})
		hung := make(chan struct{}, 1)
		cfg := dedup.HandlerConfig{InProgressInterval: 200 * time.Millisecond, Timeout: 300 * time.Millisecond}
		b.consume(t, cfg, func(ctx context.Context, tx *sqlx.Tx, msg jetstream.Msg) error {
			hung <- struct{}{}
			<-release // a call that ignores ctx
			return nil
		})
		t.Cleanup(func() { close(release) }) // before the consumer stops
		<-hung
		// Another instance takes the message once AckWait runs out.
		b.consume(t, cfg, writeEventEffect)
		testenv.Eventually(t, 15*time.Second, func() bool {
			return b.effects(t, consumerName, "e1") == 1
		}, "the message of a hung handler is redelivered after Timeout and processed")
	})

	t.Run("panics without consumer name", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		require.Panics(t, func() {
			b.p.Handler(dedup.HandlerConfig{}, writeEventEffect)
		})
	})
}
