package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// metricsFlags serve HTTP on a free port and refresh the backlog gauges
// every second.
var metricsFlags = []string{"--http-addr", "127.0.0.1:0", "--metrics-schedule", "@every 1s"}

var servingHTTP = regexp.MustCompile(`msg="serving HTTP" addr=(\S+)`)

// httpBase waits until p logged the address it serves HTTP on and returns
// its base URL.
func httpBase(t *testing.T, p *process) string {
	t.Helper()
	p.WaitLog(t, `msg="serving HTTP"`, 10*time.Second)
	m := servingHTTP.FindStringSubmatch(p.Logs())
	require.NotNil(t, m, "address in the logs")
	return "http://" + m[1]
}

// get fetches url and returns the status code and body.
func get(t *testing.T, url string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	require.NoError(t, err)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(body)
}

// scrape reads /metrics and returns each sample by its name and labels as
// exposed (`outbox_events_published_total{outcome="success"}`).
func scrape(t *testing.T, base string) map[string]float64 {
	t.Helper()
	code, body := get(t, base+"/metrics")
	require.Equal(t, http.StatusOK, code, body)
	out := map[string]float64{}
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		require.Positive(t, i, "sample line %q", line)
		v, err := strconv.ParseFloat(line[i+1:], 64)
		require.NoError(t, err, "sample line %q", line)
		out[line[:i]] = v
	}
	return out
}

// readyz returns /readyz's status code and report.
func readyz(t *testing.T, base string) (int, map[string]any) {
	t.Helper()
	code, body := get(t, base+"/readyz")
	var r map[string]any
	require.NoError(t, json.Unmarshal([]byte(body), &r), body)
	return code, r
}

const (
	mSuccess = `outbox_events_published_total{outcome="success"}`
	mFailed  = `outbox_events_published_total{outcome="failed"}`
	mLeader  = `outbox_leader`
)

func TestMetricsEndpoints(t *testing.T) {
	t.Parallel()
	b := setup(t)
	subject := b.prefix + ".order.updated"
	write := func(events ...outbox.Event) {
		tx, err := b.db.Beginx()
		require.NoError(t, err)
		_, err = b.w.Write(context.Background(), tx, events...)
		require.NoError(t, err)
		require.NoError(t, tx.Commit())
	}
	var events []outbox.Event
	for i := range 20 {
		events = append(events, outbox.Event{EntityType: "order", EntityID: fmt.Sprint(i % 4), Type: "OrderUpdated",
			Subject: subject, Data: payload{Entity: fmt.Sprint(i % 4), N: i/4 + 1}})
	}
	// No stream covers the first event of "stuck": with --max-attempts 1 it
	// is FAILED at once, and blocks the entity's second event.
	events = append(events,
		outbox.Event{EntityType: "order", EntityID: "stuck", Type: "OrderUpdated",
			Subject: "nostream" + testenv.Suffix() + ".order", Data: payload{Entity: "stuck", N: 1}},
		outbox.Event{EntityType: "order", EntityID: "stuck", Type: "OrderUpdated",
			Subject: subject, Data: payload{Entity: "stuck", N: 2}})
	write(events...)

	args := append([]string{"--max-attempts", "1"}, metricsFlags...)
	leader := startPublisher(t, "leader", b.db.DSN, args...)
	base := httpBase(t, leader)

	code, body := get(t, base+"/healthz")
	require.Equal(t, http.StatusOK, code)
	require.Equal(t, "ok\n", body)

	var m map[string]float64
	testenv.Eventually(t, 30*time.Second, func() bool {
		m = scrape(t, base)
		return m[mSuccess] == 20 && m[mFailed] == 1 && m["outbox_failed_events"] == 1
	}, "published and FAILED events counted, FAILED gauge refreshed")
	require.Equal(t, 1.0, m[mLeader])
	require.Zero(t, m[`outbox_events_published_total{outcome="retried"}`])
	require.Equal(t, 20.0, m["outbox_publish_latency_seconds_count"], "one latency per acked event")
	require.Positive(t, m["outbox_publish_latency_seconds_sum"])
	require.Positive(t, m["outbox_batch_duration_seconds_count"])
	require.GreaterOrEqual(t, m["outbox_batch_size_events_sum"], 21.0, "claimed events")
	require.Equal(t, 1.0, m["outbox_ready_events"], "the blocked event waits")
	require.Equal(t, 1.0, m["outbox_blocked_entities"])
	require.Positive(t, m["outbox_oldest_ready_age_seconds"])
	require.Positive(t, m["outbox_backlog_refresh_timestamp_seconds"])
	require.Contains(t, m, "go_goroutines", "Go runtime metrics")
	require.Contains(t, m, "process_resident_memory_bytes", "process metrics")

	code, r := readyz(t, base)
	require.Equal(t, http.StatusOK, code, r)
	require.Equal(t, map[string]any{"ready": true, "role": "leader", "database": "ok", "nats": "ok",
		"loop": "ok", "paused": false}, r)

	// A second publisher stands by, and says so.
	standby := startPublisher(t, "standby", b.db.DSN, metricsFlags...)
	sbase := httpBase(t, standby)
	standby.WaitLog(t, logStandingBy, 20*time.Second)
	code, r = readyz(t, sbase)
	require.Equal(t, http.StatusOK, code, r)
	require.Equal(t, "standby", r["role"])
	require.Zero(t, scrape(t, sbase)[mLeader])

	// The metrics move as more events flow, and the backlog empties once
	// the FAILED event is requeued (its stream still missing, it fails
	// again, so its entity stays blocked).
	write(events[:5]...)
	testenv.Eventually(t, 30*time.Second, func() bool {
		return scrape(t, base)[mSuccess] == 25
	}, "5 more events published")
	requireCLI(t, "requeue", "--all", "--database-url", b.db.DSN)
	testenv.Eventually(t, 30*time.Second, func() bool {
		return scrape(t, base)[mFailed] == 2
	}, "the requeued event failed again")
}

// newRestartableNATS starts an in-process NATS server with JetStream that
// a test can stop and start again on the same port and store.
func newRestartableNATS(t *testing.T) *testenv.NATSServer { return testenv.StartNATSServer(t, nil) }

func TestMetricsCountReconnectsAndReadyzFollowsTheBroker(t *testing.T) {
	t.Parallel()
	ns := newRestartableNATS(t)
	nc, err := nats.Connect(ns.URL(), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	require.NoError(t, err)
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	prefix := "t" + testenv.Suffix()
	// File storage: the stream must survive the broker's restart. The
	// server and its store go when the test ends.
	_, err = js.CreateStream(t.Context(), jetstream.StreamConfig{Name: "T_" + strings.ToUpper(prefix),
		Subjects: []string{prefix + ".>"}, Storage: jetstream.FileStorage, Duplicates: 2 * time.Minute})
	require.NoError(t, err)
	b := newBundle(t, js, "", prefix)
	s := b.seqWriter(prefix+".order.updated", []string{"a", "b"}, 1)
	require.NoError(t, s.write(context.Background(), 5, 1))

	p := startPublisher(t, "publisher", b.db.DSN, append([]string{"--nats-url", ns.URL()}, metricsFlags...)...)
	base := httpBase(t, p)
	testenv.Eventually(t, 30*time.Second, func() bool { return scrape(t, base)[mSuccess] == 5 }, "5 events published")

	// Broker down: not ready, and says why; back: ready, one reconnect.
	ns.Stop()
	testenv.Eventually(t, 20*time.Second, func() bool {
		code, r := readyz(t, base)
		return code == http.StatusServiceUnavailable && r["nats"] != "ok" && r["database"] == "ok"
	}, "/readyz reports the broker down")
	ns.Start()
	testenv.Eventually(t, 30*time.Second, func() bool {
		code, _ := readyz(t, base)
		return code == http.StatusOK && scrape(t, base)["outbox_nats_reconnects_total"] >= 1
	}, "ready again after the broker returned, reconnect counted")

	// The LISTEN connection is cut: it reconnects, and that is counted.
	testenv.Eventually(t, 20*time.Second, func() bool {
		return b.db.Int(t, `SELECT count(pg_terminate_backend(pid))::int FROM pg_stat_activity
			WHERE query LIKE 'LISTEN %outbox_' || to_regclass('events')::oid || '%'`) == 1
	}, "LISTEN connection terminated")
	testenv.Eventually(t, 30*time.Second, func() bool {
		return scrape(t, base)["outbox_database_reconnects_total"] >= 1
	}, "database reconnect counted")

	require.NoError(t, s.write(context.Background(), 5, 1))
	testenv.Eventually(t, 30*time.Second, func() bool { return scrape(t, base)[mSuccess] == 10 },
		"publishing goes on after both reconnects")
}
