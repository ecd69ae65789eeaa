//go:build faults

package integration

import (
	"context"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lib/pq"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgnats/outbox/internal/bench"
	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// manifestMemoryLimit is the memory limit of the publisher container in
// deploy/kubernetes/publisher.yaml.
const manifestMemoryLimit = 256 << 20

// faultBigEvents drains a backlog of 2,000 events of about 900 KiB with the
// publisher at its default batch settings (500 rows, --batch-bytes 32 MiB),
// sampling its resident memory from /proc: the peak must stay under the
// memory limit of the shipped Kubernetes manifest. The broker is an
// in-process server whose stream keeps only the newest 256 MiB; a core
// subscriber on the stream's subjects counts every message as it passes
// (there is no dedup consumer in this row: a duplicate counts as one after
// dedup too).
func faultBigEvents(t *testing.T) faultRow {
	const (
		entities, perEntity = 20, 100
		size                = 900 << 10
	)
	ns := testenv.StartNATSServer(t, nil)
	js := faultNATS(t, ns.URL())
	prefix := "t" + testenv.Suffix()
	name := "F_" + strings.ToUpper(prefix)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	_, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: name, Subjects: []string{prefix + ".>"},
		Storage: jetstream.FileStorage, Duplicates: 2 * time.Minute, MaxBytes: 256 << 20, Discard: jetstream.DiscardOld})
	cancel()
	if err != nil {
		t.Fatalf("create stream: %v", err)
	}
	b := newBundle(t, js, name, prefix)

	var pass passingMessages
	nc, err := nats.Connect(ns.URL())
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(nc.Close)
	sub, err := nc.Subscribe(prefix+".>", pass.add)
	if err != nil {
		t.Fatalf("subscribe: %v", err)
	}
	_ = sub.SetPendingLimits(-1, -1)
	if err := nc.Flush(); err != nil {
		t.Fatalf("flush: %v", err)
	}

	// The backlog, written before the publisher starts, so every claim
	// finds far more than a batch of big rows due. It is inserted in SQL,
	// as the writer would store it (a JSON payload as bytes), because 1.8 GB
	// through the writer takes minutes and the writer is not under test.
	written := map[string]bool{}
	for n := 1; n <= perEntity; n++ {
		var ids []string
		err := b.db.Select(&ids, `INSERT INTO events (event_id, event_target, event_type, entity_type, entity_id, event_data)
			SELECT gen_random_uuid(), $1, 'OrderUpdated', 'order', e,
				convert_to(json_build_object('entity', e, 'n', $2::int, 'pad', repeat('x', $3))::text, 'UTF8')
			FROM unnest($4::text[]) e ORDER BY e
			RETURNING event_id`, prefix+".order.updated", n, size, pq.Array(entityNames("big-", entities)))
		if err != nil {
			t.Fatalf("write the backlog: %v", err)
		}
		for _, id := range ids {
			written[id] = true
		}
	}

	p := startPublisher(t, "publisher", b.db.DSN, "--nats-url", ns.URL())
	pid := p.cmd.Process.Pid
	var peakRSS atomic.Int64
	stopSampling := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			if kib, err := bench.StatusKiB(pid, "VmRSS"); err == nil && kib > peakRSS.Load() {
				peakRSS.Store(kib)
			}
			select {
			case <-stopSampling:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	began := time.Now()
	drained := waitFor(5*time.Minute, func() bool { return b.db.Count(t, "SUCCESS") == len(written) })
	took := time.Since(began)
	hwm, hwmErr := bench.StatusKiB(pid, "VmHWM")
	close(stopSampling)
	<-sampled
	passed := waitFor(30*time.Second, func() bool { return pass.distinct() >= len(written) })

	r := pass.row(written)
	r.note("%d events of %d KiB drained in %s: %v", len(written), size>>10, took.Round(100*time.Millisecond), drained)
	r.note("publisher RSS sampled every 20 ms: peak %.1f MiB; VmHWM %.1f MiB; limit %d MiB",
		float64(peakRSS.Load())/1024, float64(hwm)/1024, manifestMemoryLimit>>20)
	switch {
	case !drained || !passed:
		r.note("not all events published and seen (SUCCESS=%d, seen %d)", b.db.Count(t, "SUCCESS"), pass.distinct())
		r.failed = true
	case hwmErr != nil:
		r.note("read VmHWM: %v", hwmErr)
		r.failed = true
	case hwm<<10 >= manifestMemoryLimit || peakRSS.Load()<<10 >= manifestMemoryLimit:
		r.note("resident memory reached the manifest's limit")
		r.failed = true
	}
	if r.lost != 0 || r.unexpected != 0 || r.dupAfter != 0 || r.inversions != 0 {
		r.failed = true
	}
	return r
}

// passingMessages records, of each message a core subscriber sees, its
// event id and its entity's seq, never its payload.
type passingMessages struct {
	mu         sync.Mutex
	count      map[string]int
	lastSeq    map[string]int64
	inversions int
}

func (m *passingMessages) add(msg *nats.Msg) {
	id := msg.Header.Get(outbox.HeaderEventID)
	entity := msg.Header.Get(outbox.HeaderEntityID)
	seq, _ := strconv.ParseInt(msg.Header.Get(outbox.HeaderSeq), 10, 64)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.count == nil {
		m.count, m.lastSeq = map[string]int{}, map[string]int64{}
	}
	m.count[id]++
	if m.count[id] > 1 {
		return // a copy: order is judged on first copies
	}
	if seq <= m.lastSeq[entity] {
		m.inversions++
	}
	m.lastSeq[entity] = max(m.lastSeq[entity], seq)
}

func (m *passingMessages) distinct() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.count)
}

// row counts what passed against the events written.
func (m *passingMessages) row(written map[string]bool) faultRow {
	m.mu.Lock()
	defer m.mu.Unlock()
	r := faultRow{written: len(written), inversions: m.inversions}
	for id, n := range m.count {
		if !written[id] {
			r.unexpected++
		}
		r.dupBefore += n - 1
	}
	for id := range written {
		if m.count[id] > 0 {
			r.delivered++
		} else {
			r.lost++
		}
	}
	r.dupAfter = r.dupBefore
	if r.dupBefore > 0 {
		r.note("%d copies (no dedup consumer in this row)", r.dupBefore)
	}
	return r
}
