package poller_test

import (
	"context"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// An event no stream covers is retried MaxAttempts times, then FAILED; its
// entity stays blocked while others flow, and drains in order once a stream
// covers the subject and the event is requeued.
func TestUnroutableEventFailsAndBlocksItsEntity(t *testing.T) {
	t.Parallel()
	b := setup(t)
	prefix := "p" + testenv.Suffix()
	good, bad := prefix+".good.x", prefix+".bad.x"
	stream := b.createStream(t, jetstream.StreamConfig{
		Subjects: []string{prefix + ".good.>"}, Storage: jetstream.MemoryStorage, Duplicates: 2 * time.Minute,
	})
	cfg := fastConfig()
	p := b.start(t, cfg)

	blocked := []outbox.Event{
		{EntityType: "order", EntityID: "blocked", Type: "Created", Subject: bad, Data: map[string]int{"n": 0}},
		{EntityType: "order", EntityID: "blocked", Type: "Changed", Subject: good, Data: map[string]int{"n": 1}},
		{EntityType: "order", EntityID: "blocked", Type: "Changed", Subject: good, Data: map[string]int{"n": 2}},
	}
	others := changes(good, 5, 2)
	b.write(t, append(blocked, others...)...)

	testenv.Eventually(t, 15*time.Second, func() bool {
		return b.db.Count(t, "FAILED") == 1 && b.db.Count(t, "SUCCESS") == len(others)
	}, "the unroutable event FAILED and the other entities SUCCESS")
	var failed struct {
		Attempts  int    `db:"attempts"`
		LastError string `db:"last_error"`
		Subject   string `db:"event_target"`
	}
	require.NoError(t, b.db.Get(&failed, `SELECT attempts, last_error, event_target FROM events WHERE event_status = 'FAILED'`))
	require.Equal(t, bad, failed.Subject)
	require.Equal(t, cfg.MaxAttempts, failed.Attempts)
	require.Contains(t, failed.LastError, bad)

	// A later event of another entity is published, so the loop has claimed
	// past the blocked entity's waiting events without taking them.
	b.write(t, changes(good, 1, 1)...)
	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(others)+1 },
		"a later event of another entity SUCCESS")
	require.Equal(t, 2, b.db.Int(t, `SELECT count(*) FROM events
		WHERE entity_id = 'blocked' AND event_status = 'READY' AND attempts = 0`), "blocked events must wait READY")
	require.EqualValues(t, 1, p.Stats().Failed)
	require.EqualValues(t, cfg.MaxAttempts, p.Stats().Refused)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info, err := stream.Info(ctx)
	require.NoError(t, err)
	sc := info.Config
	sc.Subjects = append(sc.Subjects, prefix+".bad.>")
	_, err = b.js.UpdateStream(ctx, sc)
	require.NoError(t, err)
	b.requeueFailed(t)

	total := len(blocked) + len(others) + 1
	testenv.Eventually(t, 15*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == total },
		"all %d events SUCCESS after the requeue", total)
	require.Zero(t, b.db.Count(t, "FAILED"))
	requireOnceInOrder(t, b.received(t), total)
}

// requeueFailed puts FAILED events back to READY, as 'publisher requeue'
// does.
func (b *bundle) requeueFailed(t *testing.T) {
	t.Helper()
	_, err := b.db.Exec(`UPDATE events SET event_status = 'READY', attempts = 0, available_at = now()
		WHERE event_status = 'FAILED'`)
	require.NoError(t, err)
}

// An event over the stream's max_msg_size can never be stored: it is FAILED
// on the first refusal, and other entities flow.
func TestTooLargeEventFailsAtOnce(t *testing.T) {
	t.Parallel()
	b := setup(t)
	prefix := "p" + testenv.Suffix()
	b.createStream(t, jetstream.StreamConfig{
		Subjects: []string{prefix + ".>"}, Storage: jetstream.MemoryStorage, MaxMsgSize: 1024,
		Duplicates: 2 * time.Minute,
	})
	p := b.start(t, fastConfig())

	subject := prefix + ".order.x"
	big := outbox.Event{EntityType: "order", EntityID: "big", Type: "Created", Subject: subject,
		Data: map[string]string{"pad": strings.Repeat("x", 4096)}}
	after := outbox.Event{EntityType: "order", EntityID: "big", Type: "Changed", Subject: subject, Data: map[string]int{}}
	others := changes(subject, 5, 2)
	b.write(t, append([]outbox.Event{big, after}, others...)...)

	testenv.Eventually(t, 10*time.Second, func() bool {
		return b.db.Count(t, "FAILED") == 1 && b.db.Count(t, "SUCCESS") == len(others)
	}, "the large event FAILED and the other entities SUCCESS")
	var failed struct {
		Attempts  int    `db:"attempts"`
		LastError string `db:"last_error"`
	}
	require.NoError(t, b.db.Get(&failed, `SELECT attempts, last_error FROM events WHERE event_status = 'FAILED'`))
	require.Equal(t, 1, failed.Attempts, "a permanent refusal is not retried")
	require.Contains(t, failed.LastError, "max_msg_size")
	// Stats are counted after the commit the database already shows.
	testenv.Eventually(t, 5*time.Second, func() bool { return p.Stats().Failed == 1 }, "Stats().Failed == 1")
	require.EqualValues(t, 1, p.Stats().Refused)
	require.Equal(t, 1, b.db.Int(t, `SELECT count(*) FROM events WHERE entity_id = 'big' AND event_status = 'READY'`),
		"the large event's entity must stay blocked")
	requireOnceInOrder(t, b.received(t), len(others))
}

// A full stream under DiscardNew is an outage, not a refusal: the rows stay
// READY with no attempt used, and go out once the stream has room.
func TestFullStreamBacksOffWithoutBurningAttempts(t *testing.T) {
	t.Parallel()
	b := setup(t)
	prefix := "p" + testenv.Suffix()
	stream := b.createStream(t, jetstream.StreamConfig{
		Subjects: []string{prefix + ".>"}, Storage: jetstream.MemoryStorage, MaxMsgs: 5,
		Discard: jetstream.DiscardNew, Duplicates: 2 * time.Minute,
	})
	p := b.start(t, fastConfig())
	events := changes(prefix+".order.changed", 2, 5)
	b.write(t, events...)

	testenv.Eventually(t, 10*time.Second, func() bool {
		return b.db.Count(t, "SUCCESS") == 5 && p.Stats().Backoffs >= 2
	}, "5 events SUCCESS and the loop backing off")
	require.Equal(t, len(events)-5, b.db.Count(t, "READY"))
	require.Zero(t, b.db.Count(t, "FAILED"))
	require.Zero(t, b.db.Int(t, `SELECT count(*) FROM events WHERE attempts > 0`), "a full stream must not burn attempts")
	require.Zero(t, p.Stats().Refused)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info, err := stream.Info(ctx)
	require.NoError(t, err)
	sc := info.Config
	sc.MaxMsgs = 100
	_, err = b.js.UpdateStream(ctx, sc)
	require.NoError(t, err)

	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == len(events) },
		"all %d events SUCCESS once the stream has room", len(events))
	require.Zero(t, b.db.Count(t, "FAILED"))
	requireOnceInOrder(t, b.received(t), len(events))
}

// Stopping the broker mid-drain and writing events while it is down loses
// nothing: once it is back all are published, none FAILED, no attempts
// used, each in the stream once, in order.
func TestBrokerRestartLosesNothing(t *testing.T) {
	t.Parallel()
	b, srv := setupServer(t)
	p := b.start(t, fastConfig())

	subject := b.prefix + ".order.changed"
	before := changes(subject, 10, 100)
	b.write(t, before...)
	testenv.Eventually(t, 10*time.Second, func() bool { return p.Stats().Published > 0 },
		"publishing starts before the outage")

	srv.Stop()
	during := changes(subject, 5, 10)
	b.write(t, during...)
	testenv.Eventually(t, 15*time.Second, func() bool { return p.Stats().Backoffs >= 2 },
		"the loop backs off while the broker is down")
	require.Positive(t, b.db.Count(t, "READY"))
	srv.Start()
	after := changes(subject, 5, 10)
	b.write(t, after...)

	total := len(before) + len(during) + len(after)
	testenv.Eventually(t, 30*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == total },
		"all %d events SUCCESS after the restart", total)
	require.Zero(t, b.db.Count(t, "FAILED"))
	require.Zero(t, b.db.Int(t, `SELECT count(*) FROM events WHERE attempts > 0`), "an outage must not burn attempts")
	require.Zero(t, p.Stats().Refused)
	requireOnceInOrder(t, b.received(t), total)
}

// The Outbox-Created-At header is the event's created_at instant whatever
// the time zone of the sessions that write and publish it: here the writer
// and the publisher run in zones 13:45 and 5:45 ahead of UTC, and the
// instant in the header equals the stored one.
func TestCreatedAtHeaderIsTheStoredInstantInAnyTimeZone(t *testing.T) {
	t.Parallel()
	b := setup(t)
	inZone := func(zone string) *sqlx.DB {
		db, err := sqlx.Open("postgres", b.db.DSN+"&timezone="+url.QueryEscape(zone))
		require.NoError(t, err)
		t.Cleanup(func() { db.Close() })
		var got string
		require.NoError(t, db.Get(&got, `SHOW TimeZone`))
		require.Equal(t, zone, got)
		return db
	}
	writer, publisher := inZone("Pacific/Chatham"), inZone("Asia/Kathmandu")
	tx, err := writer.Beginx()
	require.NoError(t, err)
	_, err = b.w.Write(context.Background(), tx, changes(b.prefix+".order.changed", 3, 1)...)
	require.NoError(t, err)
	require.NoError(t, tx.Commit())
	cfg := fastConfig()
	cfg.DB = publisher.DB
	b.start(t, cfg)
	testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Count(t, "SUCCESS") == 3 }, "published")

	for _, m := range b.received(t) {
		h := m.Headers()
		at, err := time.Parse(time.RFC3339Nano, h.Get("Outbox-Created-At"))
		require.NoError(t, err)
		require.Equal(t, 1, b.db.Int(t, `SELECT count(*) FROM events WHERE event_id = $1 AND created_at = $2`,
			h.Get("Outbox-Event-Id"), at), "created_at of %s is %s", h.Get("Outbox-Event-Id"), at)
	}
}
