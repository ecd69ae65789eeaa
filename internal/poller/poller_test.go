package poller_test

import (
	"context"
	"database/sql"
	"fmt"
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

// bundle is one test's database schema, stream and publisher settings.
type bundle struct {
	db     *testenv.DB
	nc     *nats.Conn
	js     jetstream.JetStream
	stream jetstream.Stream
	prefix string
	w      *outbox.Writer
}

func setup(t *testing.T) *bundle {
	t.Helper()
	nc, js := testenv.NATS(t)
	b := newBundle(t, nc, js)
	b.stream, b.prefix = testenv.Stream(t, js)
	return b
}

// setupServer is setup on an in-process NATS server of the test's own,
// which it may stop and restart: the stream is file-backed, so it survives
// a restart.
func setupServer(t *testing.T) (*bundle, *testenv.NATSServer) {
	t.Helper()
	srv := testenv.StartNATSServer(t, nil)
	nc, js := srv.Connect(t)
	b := newBundle(t, nc, js)
	b.prefix = "p" + testenv.Suffix()
	b.createStream(t, jetstream.StreamConfig{
		Subjects: []string{b.prefix + ".>"}, Storage: jetstream.FileStorage, Duplicates: 2 * time.Minute,
	})
	return b, srv
}

// newBundle gives the test its own schema and a writer, publishing on nc;
// the caller sets stream and prefix.
func newBundle(t *testing.T, nc *nats.Conn, js jetstream.JetStream) *bundle {
	t.Helper()
	w, err := outbox.NewWriter(outbox.Config{})
	require.NoError(t, err)
	return &bundle{db: testenv.NewDB(t), nc: nc, js: js, w: w}
}

// start runs a poller until the test ends.
func (b *bundle) start(t *testing.T, cfg poller.Config) *poller.Poller {
	t.Helper()
	p, _ := b.run(t, cfg)
	return p
}

// run runs a poller and returns it with a stop function, which cancels it,
// waits for Run to return and returns its error. Fields of cfg left zero
// among DB, DSN and NATS come from the bundle. The poller is stopped when
// the test ends if stop was not called.
func (b *bundle) run(t *testing.T, cfg poller.Config) (*poller.Poller, func() error) {
	t.Helper()
	if cfg.DB == nil {
		cfg.DB = b.db.DB.DB
	}
	if cfg.DSN == "" {
		cfg.DSN = b.db.DSN
	}
	if cfg.NATS == nil {
		cfg.NATS = b.nc
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	p, err := poller.New(cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	var (
		once   sync.Once
		runErr error
	)
	stop := func() error {
		once.Do(func() {
			cancel()
			select {
			case runErr = <-done:
			case <-time.After(30 * time.Second):
				runErr = fmt.Errorf("Run did not return within 30s of cancellation")
			}
		})
		return runErr
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("poller Run: %v", err)
		}
	})
	return p, stop
}

// createStream creates a stream for the test on the bundle's JetStream,
// deleted when the test ends, and makes it the one received reads. An empty
// Name gets a unique one.
func (b *bundle) createStream(t *testing.T, cfg jetstream.StreamConfig) jetstream.Stream {
	t.Helper()
	if cfg.Name == "" {
		cfg.Name = "T_" + strings.ToUpper(testenv.Suffix())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := b.js.CreateStream(ctx, cfg)
	require.NoError(t, err)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = b.js.DeleteStream(ctx, cfg.Name)
	})
	b.stream = s
	return s
}

func (b *bundle) write(t *testing.T, events ...outbox.Event) {
	t.Helper()
	tx, err := b.db.Beginx()
	require.NoError(t, err)
	_, err = b.w.Write(context.Background(), tx, events...)
	require.NoError(t, err)
	require.NoError(t, tx.Commit())
}

// received reads every message of the stream, in stream order.
func (b *bundle) received(t *testing.T) []jetstream.Msg {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info, err := b.stream.Info(ctx)
	require.NoError(t, err)
	c, err := b.stream.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	require.NoError(t, err)
	var out []jetstream.Msg
	for uint64(len(out)) < info.State.Msgs {
		m, err := c.Next(jetstream.FetchMaxWait(5 * time.Second))
		require.NoError(t, err)
		out = append(out, m)
	}
	return out
}

// fastConfig is a poller configuration that retries, backs off and fails
// over quickly, so failure tests finish in seconds.
func fastConfig() poller.Config {
	return poller.Config{
		BatchSize:     100,
		PollInterval:  100 * time.Millisecond,
		AckTimeout:    2 * time.Second,
		MaxAttempts:   3,
		RetryBase:     50 * time.Millisecond,
		RetryMax:      200 * time.Millisecond,
		BackoffMin:    20 * time.Millisecond,
		BackoffMax:    500 * time.Millisecond,
		LeaderTimeout: 2 * time.Second,
	}
}

// changes returns perEntity "Changed" events for each of entities entities
// of type "order", interleaved, published to subject; Data is {"n": i}.
func changes(subject string, entities, perEntity int) []outbox.Event {
	var events []outbox.Event
	for i := range perEntity {
		for e := range entities {
			events = append(events, outbox.Event{
				EntityType: "order", EntityID: fmt.Sprint(e), Type: "Changed",
				Subject: subject, Data: map[string]int{"n": i},
			})
		}
	}
	return events
}

// requireOnceInOrder checks that msgs hold want distinct events, none twice,
// and that each entity's events are in seq order.
func requireOnceInOrder(t *testing.T, msgs []jetstream.Msg, want int) {
	t.Helper()
	seen := map[string]bool{}
	last := map[string]int64{}
	for _, m := range msgs {
		h := m.Headers()
		id := h.Get(outbox.HeaderEventID)
		require.False(t, seen[id], "event %s is in the stream twice", id)
		seen[id] = true
		require.Equal(t, id, h.Get(jetstream.MsgIDHeader))
		seq, err := strconv.ParseInt(h.Get(outbox.HeaderSeq), 10, 64)
		require.NoError(t, err)
		ent := h.Get(outbox.HeaderEntityType) + "/" + h.Get(outbox.HeaderEntityID)
		require.Greater(t, seq, last[ent], "entity %s out of order", ent)
		last[ent] = seq
	}
	require.Len(t, seen, want)
}

// streamIDs returns the event ids in msgs.
func streamIDs(msgs []jetstream.Msg) map[string]bool {
	ids := make(map[string]bool, len(msgs))
	for _, m := range msgs {
		ids[m.Headers().Get(outbox.HeaderEventID)] = true
	}
	return ids
}

func TestPublishHappyPath(t *testing.T) {
	t.Parallel()
	b := setup(t)
	const entities, perEntity = 20, 25
	var events []outbox.Event
	for i := range perEntity {
		for e := range entities {
			events = append(events, outbox.Event{
				EntityType: "order", EntityID: fmt.Sprint(e), Type: "Changed",
				Subject: b.prefix + ".order.changed", Data: map[string]int{"n": i},
			})
		}
	}
	b.write(t, events[:250]...)
	b.start(t, poller.Config{BatchSize: 64, Logger: testLogger(t)})
	b.write(t, events[250:]...)

	testenv.Eventually(t, 30*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(events) },
		"all %d events SUCCESS", len(events))
	msgs := b.received(t)
	require.Len(t, msgs, len(events))
	last := map[string]int{}
	for _, m := range msgs {
		var n struct{ N int }
		require.NoError(t, jsonUnmarshal(m.Data(), &n))
		ent := m.Headers().Get(outbox.HeaderEntityID)
		if prev, ok := last[ent]; ok {
			require.Equal(t, prev+1, n.N, "entity %s out of order", ent)
		}
		last[ent] = n.N
		require.Equal(t, m.Headers().Get(outbox.HeaderEventID), m.Headers().Get(jetstream.MsgIDHeader))
	}
}

func TestNewRejectsInvalidConfig(t *testing.T) {
	t.Parallel()
	nc, _ := testenv.NATS(t)
	db, err := sql.Open("postgres", testenv.DatabaseURL())
	require.NoError(t, err)
	t.Cleanup(func() { db.Close() })
	valid := poller.Config{DB: db, DSN: testenv.DatabaseURL(), NATS: nc}
	_, err = poller.New(valid)
	require.NoError(t, err, "the valid base config must pass")

	for name, tc := range map[string]struct {
		edit func(*poller.Config)
		want string
	}{
		"missing DB":          {func(c *poller.Config) { c.DB = nil }, "DB"},
		"missing DSN":         {func(c *poller.Config) { c.DSN = "" }, "DSN"},
		"missing NATS":        {func(c *poller.Config) { c.NATS = nil }, "NATS"},
		"table with space":    {func(c *poller.Config) { c.Table = "bad name" }, "bad name"},
		"table with quote":    {func(c *poller.Config) { c.Table = `events"; DROP TABLE x; --` }, "events"},
		"table with two dots": {func(c *poller.Config) { c.Table = "a.b.c" }, "a.b.c"},
		"negative batch size": {func(c *poller.Config) { c.BatchSize = -1 }, "negative"},
		"negative duration":   {func(c *poller.Config) { c.AckTimeout = -time.Second }, "negative"},
	} {
		t.Run(name, func(t *testing.T) {
			cfg := valid
			tc.edit(&cfg)
			p, err := poller.New(cfg)
			require.Error(t, err)
			require.Nil(t, p)
			require.Contains(t, err.Error(), tc.want)
		})
	}
}

func TestRunFailsWithoutEventsTable(t *testing.T) {
	t.Parallel()
	b := setup(t)
	cfg := fastConfig()
	cfg.DB, cfg.DSN, cfg.NATS, cfg.Logger = b.db.DB.DB, b.db.DSN, b.nc, testLogger(t)
	cfg.Table = "no_such_events"
	p, err := poller.New(cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err = p.Run(ctx)
	require.Error(t, err)
	require.Contains(t, err.Error(), "no_such_events")
}

// Cancelling Run while a backlog drains stops it cleanly: Run returns nil,
// the batch in flight is marked (the stream holds exactly the SUCCESS rows),
// no row is left locked, retried or FAILED, and a new poller drains the
// rest. Several stops make it likely one lands mid-batch.
func TestGracefulStopLeavesNothingStuck(t *testing.T) {
	t.Parallel()
	b := setup(t)
	events := changes(b.prefix+".order.changed", 50, 100)
	b.write(t, events...)
	cfg := fastConfig()
	cfg.BatchSize = 50

	for round := range 5 {
		p, stop := b.run(t, cfg)
		testenv.Eventually(t, 10*time.Second, func() bool { return p.Stats().Published > 0 },
			"round %d: publishing starts", round)
		require.NoError(t, stop(), "round %d", round)
		require.False(t, p.Stats().Leader)

		success, ready := b.db.Count(t, "SUCCESS"), b.db.Count(t, "READY")
		require.Equal(t, len(events), success+ready, "every row SUCCESS or READY")
		require.Positive(t, ready, "the backlog drained before the stop; make it larger")
		require.Zero(t, b.db.Int(t, `SELECT count(*) FROM events WHERE attempts > 0`))
		info, err := b.stream.Info(context.Background())
		require.NoError(t, err)
		require.EqualValues(t, success, info.State.Msgs,
			"round %d: the stream must hold exactly the SUCCESS events", round)

		// No claim transaction is left open: every READY row can be locked.
		tx, err := b.db.Beginx()
		require.NoError(t, err)
		var lockable int
		require.NoError(t, tx.Get(&lockable, `SELECT count(*) FROM
			(SELECT 1 FROM events WHERE event_status = 'READY' FOR UPDATE SKIP LOCKED) r`))
		require.NoError(t, tx.Rollback())
		require.Equal(t, ready, lockable, "READY rows still locked after Run returned")
		testenv.Eventually(t, 5*time.Second, func() bool {
			return b.db.Int(t, `SELECT count(*) FROM pg_locks
				WHERE locktype = 'advisory' AND objid = 'events'::regclass::oid`) == 0
		}, "the leader lock is released")
	}

	inStream := streamIDs(b.received(t))
	for _, id := range b.db.IDs(t, "SUCCESS") {
		require.True(t, inStream[id], "SUCCESS event %s is not in the stream", id)
	}
	b.start(t, cfg)
	testenv.Eventually(t, 30*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(events) },
		"a new poller drains the remaining events")
	requireOnceInOrder(t, b.received(t), len(events))
}
