package integration

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// bundle is one test's schema (with the outbox tables), NATS connection,
// stream and writer.
type bundle struct {
	db     *testenv.DB
	js     jetstream.JetStream
	stream string // name of the stream covering prefix.>
	prefix string // the stream's subject prefix, unique to the test
	w      *outbox.Writer
	// fx, when set, is the consumer's own database (its dedup table and
	// fault_effects); nil: db.
	fx *testenv.DB
}

// fxDB returns the consumer's database.
func (b *bundle) fxDB() *testenv.DB {
	if b.fx != nil {
		return b.fx
	}
	return b.db
}

// setup gives the test its own schema and its own stream (memory, 2m
// duplicate window) covering "<prefix>.>".
func setup(t *testing.T) *bundle {
	t.Helper()
	_, js := testenv.NATS(t)
	s, prefix := testenv.Stream(t, js)
	return newBundle(t, js, s.CachedInfo().Config.Name, prefix)
}

func newBundle(t *testing.T, js jetstream.JetStream, stream, prefix string) *bundle {
	t.Helper()
	w, err := outbox.NewWriter(outbox.Config{})
	require.NoError(t, err)
	return &bundle{db: testenv.NewDB(t), js: js, stream: stream, prefix: prefix, w: w}
}

// createStream creates a memory stream with a unique name from cfg, deleted
// when the test ends, and returns its name.
func createStream(t *testing.T, js jetstream.JetStream, cfg jetstream.StreamConfig) string {
	t.Helper()
	cfg.Name = "T_" + strings.ToUpper(testenv.Suffix())
	cfg.Storage = jetstream.MemoryStorage
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := js.CreateStream(ctx, cfg)
	require.NoError(t, err)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = js.DeleteStream(ctx, cfg.Name)
	})
	return cfg.Name
}

// payload is the data of every test event: the entity and the event's
// number among that entity's events, counted from 1 in write order.
type payload struct {
	Entity string `json:"entity"`
	N      int    `json:"n"`
	Pad    string `json:"pad,omitempty"`
}

// entityNames returns n entity ids with the given prefix.
func entityNames(prefix string, n int) []string {
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("%s%03d", prefix, i)
	}
	return names
}

// seqWriter writes events of type "order" for a fixed set of entities,
// numbering each entity's events in write order. One goroutine owns it: it
// serialises the writes of its entities, as the outbox requires of a
// service.
type seqWriter struct {
	w        *outbox.Writer
	db       *sqlx.DB
	subject  string
	entities []string
	next     map[string]int // last number written per entity
	rng      *rand.Rand
}

func (b *bundle) seqWriter(subject string, entities []string, seed uint64) *seqWriter {
	return &seqWriter{
		w: b.w, db: b.db.DB, subject: subject, entities: entities,
		next: map[string]int{}, rng: rand.New(rand.NewPCG(seed, 42)),
	}
}

// event returns the next event of entity.
func (s *seqWriter) event(entity string) outbox.Event {
	s.next[entity]++
	return outbox.Event{
		EntityType: "order", EntityID: entity, Type: "OrderUpdated", Subject: s.subject,
		Data: payload{Entity: entity, N: s.next[entity]},
	}
}

// write writes count events for random entities of the set, in
// transactions of 1 to maxPerTx events. The numbers of a transaction that
// does not commit are reused.
func (s *seqWriter) write(ctx context.Context, count, maxPerTx int) error {
	for count > 0 {
		n := min(count, 1+s.rng.IntN(maxPerTx))
		events := make([]outbox.Event, n)
		for i := range events {
			events[i] = s.event(s.entities[s.rng.IntN(len(s.entities))])
		}
		if err := s.commit(ctx, events...); err != nil {
			for _, ev := range events {
				s.next[ev.EntityID]--
			}
			return err
		}
		count -= n
	}
	return nil
}

// commit writes events in one transaction.
func (s *seqWriter) commit(ctx context.Context, events ...outbox.Event) error {
	tx, err := s.db.BeginTxx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback() //nolint:errcheck // no-op after commit
	if _, err := s.w.Write(ctx, tx, events...); err != nil {
		return err
	}
	return tx.Commit()
}

// written returns how many events the writer wrote.
func (s *seqWriter) written() int {
	n := 0
	for _, k := range s.next {
		n += k
	}
	return n
}

// writeAll writes count events for entities in transactions of up to 20 and
// returns the writer, so the test knows each entity's count.
func (b *bundle) writeAll(t *testing.T, entities []string, count int) *seqWriter {
	t.Helper()
	s := b.seqWriter(b.prefix+".order.updated", entities, uint64(count))
	require.NoError(t, s.write(context.Background(), count, 20))
	return s
}

// counts returns the number of events per status.
func (b *bundle) counts(t *testing.T) map[string]int {
	t.Helper()
	var rows []struct {
		Status string `db:"event_status"`
		N      int    `db:"n"`
	}
	require.NoError(t, b.db.Select(&rows, `SELECT event_status, count(*) AS n FROM events GROUP BY event_status`))
	out := map[string]int{}
	for _, r := range rows {
		out[r.Status] = r.N
	}
	return out
}

// waitAllSuccess waits until every one of want events is SUCCESS, failing
// early if any is FAILED.
func (b *bundle) waitAllSuccess(t *testing.T, want int, timeout time.Duration) {
	t.Helper()
	testenv.Eventually(t, timeout, func() bool {
		c := b.counts(t)
		require.Zero(t, c["FAILED"], "FAILED events: %v", c)
		return c["SUCCESS"] == want
	}, "not all %d events SUCCESS", want)
	require.Equal(t, map[string]int{"SUCCESS": want}, b.counts(t))
}
