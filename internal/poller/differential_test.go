package poller_test

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/lib/pq"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// The differential test of the rule of publishability: random events,
// many of them at or past a limit, are written; every event Write accepts
// must be published by a real server (the rule counts the publisher's
// headers at their longest, so with the default limits nothing it accepts
// may be refused), each once, and the connection must stay open. The
// seeded test runs in `make test`; FuzzWriteThenPublish explores further
// with `go test -fuzz FuzzWriteThenPublish ./internal/poller/`.

// source draws the choices of the event generator: from fuzz input while
// it lasts, else from a seeded generator (nil: zeros).
type source struct {
	b []byte
	r *rand.Rand
}

func (s *source) intn(n int) int {
	switch {
	case len(s.b) >= 2:
		v := int(binary.LittleEndian.Uint16(s.b))
		s.b = s.b[2:]
		return v % n
	case s.r != nil:
		return s.r.IntN(n)
	}
	return 0
}

// Characters that are fine in some fields and refused in others, besides
// every printable ASCII character.
var specials = []string{" ", "\t", "\r", "\n", "\x00", "\x01", "\x7f", "é", "\u00a0", "\u2028", "😀", "\xff"}

// field draws a string for a field whose limits lie near the given
// lengths: mostly a short plain one; else one of a length near a limit,
// empty, or with a special or printable ASCII character. A choice of 0
// always gives a short plain string, so exhausted fuzz input still makes
// valid events.
func (s *source) field(near ...int) string {
	n := 1 + s.intn(8)
	mode := s.intn(12)
	switch mode {
	case 9:
		n = max(near[s.intn(len(near))]+s.intn(41)-20, 1)
	case 11:
		return ""
	}
	b := []byte(strings.Repeat("a", n))
	if mode == 10 {
		var c string
		if s.intn(2) == 0 {
			c = specials[s.intn(len(specials))]
		} else {
			c = string(rune(33 + s.intn(94)))
		}
		i := s.intn(n)
		b = append(b[:i], append([]byte(c), b[i:]...)...)
	}
	return string(b)
}

// event draws one event. Its subject always falls under "fz.", so the one
// stream covers whatever the rule lets through.
func (s *source) event() outbox.Event {
	ev := outbox.Event{EntityType: s.field(255), EntityID: s.field(1024), Type: s.field(255)}
	if s.intn(4) == 1 {
		ev.EntityType = "fz"
	} else {
		// The protocol line leaves a little under 4000 bytes.
		ev.Subject = "fz." + s.field(3950, 4000, 4050, 4100)
	}
	for range s.intn(3) {
		if ev.Headers == nil {
			ev.Headers = map[string]string{}
		}
		// The header block ends a little over 65,000 bytes of one value.
		ev.Headers["K"+s.field(64)] = s.field(65_000, 65_100, 65_200, 65_300)
	}
	// A payload ends a few hundred bytes short of 1 MiB, the publisher's
	// headers.
	big := []int{1_048_000, 1_048_200, 1_048_300, 1_048_400}
	switch s.intn(3) {
	case 0:
		ev.Data = map[string]string{"v": s.field(1000)}
	case 1:
		ev.Data = json.RawMessage(`"` + s.field(big...) + `"`)
	default:
		ev.Data, ev.ContentType = []byte(s.field(big...)), "application/octet-stream"
	}
	return ev
}

// differential is one publisher on an in-process server with one stream
// covering "fz.>", shared by every round of a test or fuzz run.
type differential struct {
	db     *testenv.DB
	nc     *nats.Conn
	stream jetstream.Stream
	w      *outbox.Writer
	done   chan struct{} // closed when the poller's Run returned
	runErr error         // what it returned
}

func newDifferential(t testing.TB) *differential {
	t.Helper()
	srv := testenv.StartNATSServer(t, nil)
	nc, js := srv.Connect(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "FZ", Subjects: []string{"fz.>"},
		Storage: jetstream.MemoryStorage, Duplicates: time.Minute})
	if err != nil {
		t.Fatalf("create stream: %v", err)
	}
	d := &differential{db: testenv.NewDB(t), nc: nc, stream: stream, done: make(chan struct{})}
	if d.w, err = outbox.NewWriter(outbox.Config{}); err != nil {
		t.Fatal(err)
	}
	cfg := fastConfig()
	cfg.DB, cfg.DSN, cfg.NATS = d.db.DB.DB, d.db.DSN, nc
	p, err := poller.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	rctx, stop := context.WithCancel(context.Background())
	go func() {
		defer close(d.done)
		d.runErr = p.Run(rctx)
	}()
	t.Cleanup(func() {
		stop()
		select {
		case <-d.done:
		case <-time.After(30 * time.Second):
			t.Error("poller Run did not return within 30s of cancellation")
		}
	})
	return d
}

// round writes events in one transaction and checks what became of those
// Write accepted.
func (d *differential) round(t testing.TB, events []outbox.Event) {
	t.Helper()
	tx, err := d.db.Beginx()
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback() //nolint:errcheck // no-op after commit
	var ids []uuid.UUID
	for _, ev := range events {
		got, err := d.w.Write(context.Background(), tx, ev)
		if errors.Is(err, outbox.ErrInvalidEvent) {
			continue
		}
		if err != nil {
			t.Fatalf("Write returned an error that is not a validation error: %v", err)
		}
		ids = append(ids, got...)
	}
	if err := tx.Commit(); err != nil {
		t.Fatalf("commit: %v", err)
	}
	if len(ids) == 0 {
		return
	}
	idText := make([]string, len(ids))
	for i, id := range ids {
		idText[i] = id.String()
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		var ready int
		if err := d.db.Get(&ready, `SELECT count(*) FROM events WHERE event_id = ANY($1) AND event_status = 'READY'`,
			pq.Array(idText)); err != nil {
			t.Fatal(err)
		}
		if ready == 0 {
			break
		}
		select {
		case <-d.done:
			t.Fatalf("the publisher stopped: %v", d.runErr)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d accepted events still READY after 30s: a stall", ready, len(ids))
		}
		time.Sleep(20 * time.Millisecond)
	}
	var failed []struct {
		ID        string `db:"event_id"`
		LastError string `db:"last_error"`
	}
	if err := d.db.Select(&failed, `SELECT event_id, coalesce(last_error, '') AS last_error FROM events
		WHERE event_id = ANY($1) AND event_status = 'FAILED'`, pq.Array(idText)); err != nil {
		t.Fatal(err)
	}
	for _, f := range failed {
		t.Errorf("event %s accepted by Write was FAILED by the publisher: %s", f.ID, f.LastError)
	}
	if d.nc.IsClosed() {
		t.Fatalf("the NATS connection was closed: %v", d.nc.LastError())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	info, err := d.stream.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if success := d.db.Count(t, "SUCCESS"); int(info.State.Msgs) != success {
		t.Fatalf("the stream holds %d messages for %d SUCCESS events", info.State.Msgs, success)
	}
}

func TestWriteThenPublishDifferential(t *testing.T) {
	t.Parallel()
	d := newDifferential(t)
	src := &source{r: rand.New(rand.NewPCG(20261130, 10))}
	for range 80 {
		events := make([]outbox.Event, 1+src.intn(3))
		for i := range events {
			events[i] = src.event()
		}
		d.round(t, events)
	}
	accepted := d.db.Int(t, `SELECT count(*) FROM events`)
	if accepted < 10 {
		t.Fatalf("only %d events accepted: the generator tests little", accepted)
	}
	near := d.db.Int(t, `SELECT count(*) FROM events WHERE length(event_data) > 1000000
		OR length(event_target) > 3000 OR length(headers::text) > 60000 OR length(entity_id) > 1000`)
	t.Logf("%d events accepted and published, %d of them near a limit", accepted, near)
	if near < 5 {
		t.Fatalf("only %d accepted events near a limit: the generator tests little", near)
	}
}

func FuzzWriteThenPublish(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte("seed: a plain event"))
	f.Add(binary.LittleEndian.AppendUint64(nil, 0x0102030405060708))
	d := newDifferential(f)
	f.Fuzz(func(t *testing.T, in []byte) {
		src := &source{b: in}
		events := make([]outbox.Event, 1+src.intn(3))
		for i := range events {
			events[i] = src.event()
		}
		d.round(t, events)
	})
}
