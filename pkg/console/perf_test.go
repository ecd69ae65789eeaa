package console_test

import (
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/console"
)

// TestPageTimesMillionEvents measures how long each page takes to render
// over a table of a million events (docs/PERFORMANCE.md). It only runs
// with OUTBOX_CONSOLE_PERF=1: loading the table takes a while. It asserts
// nothing about time; it logs the median of 7 renders of each page.
func TestPageTimesMillionEvents(t *testing.T) {
	if os.Getenv("OUTBOX_CONSOLE_PERF") != "1" {
		t.Skip("set OUTBOX_CONSOLE_PERF=1 to measure the pages over a million events")
	}
	db := testenv.NewDB(t)
	start := time.Now()
	// A million events over 30 days, the newest 6000 within the last hour:
	// 5000 READY (100 of them retrying), 500 FAILED, the rest SUCCESS,
	// 20000 entities of 4 types.
	db.MustExec(`INSERT INTO events (event_id, event_target, event_type, entity_type, entity_id, event_data,
			headers, event_status, attempts, last_error, created_at, published_at, available_at)
		SELECT gen_random_uuid(), 'shop.' || t || '.changed', t || 'Changed', t, (i % 5000)::text,
			convert_to('{"n":' || i || ',"customer":{"email":"x@example.com"}}', 'UTF8'), '{}',
			CASE WHEN i > 995000 THEN 'READY' WHEN i % 2000 = 0 THEN 'FAILED' ELSE 'SUCCESS' END,
			CASE WHEN i > 995000 AND i % 50 = 0 THEN 2 WHEN i % 2000 = 0 THEN 10 ELSE 0 END,
			CASE WHEN i % 2000 = 0 THEN 'nats: no response from stream (' || (i % 3) || ')'
			     WHEN i > 995000 AND i % 50 = 0 THEN 'ack timeout' END,
			c, CASE WHEN i <= 995000 AND i % 2000 <> 0 THEN c + interval '20 ms' END,
			CASE WHEN i > 995000 AND i % 50 = 0 THEN now() + interval '1 hour' ELSE c END
		FROM (SELECT i, (ARRAY['order','invoice','payment','shipment'])[1 + i % 4] AS t,
			CASE WHEN i > 994000 THEN now() - make_interval(secs => (1000000 - i) * 0.5)
			     ELSE now() - interval '1 hour' - make_interval(secs => (994000 - i) * 2.6) END AS c
			FROM generate_series(1, 1000000) i) s`)
	db.MustExec(`INSERT INTO processed_message (consumer_id, message_id)
		SELECT 'consumer-' || (i % 3), event_id::text FROM events e, generate_series(0, 0) i WHERE e.seq % 10 = 0`)
	db.MustExec(`VACUUM ANALYZE events`)
	db.MustExec(`VACUUM ANALYZE processed_message`)
	t.Logf("loaded 1e6 events in %s", time.Since(start).Round(time.Second))
	var id, failedID string
	require.NoError(t, db.Get(&id, `SELECT event_id::text FROM events WHERE seq = 500000`))
	require.NoError(t, db.Get(&failedID, `SELECT event_id::text FROM events WHERE seq = 998000`))

	h, err := console.New(console.Config{DB: db.DB.DB, Authorize: allowAll})
	require.NoError(t, err)
	for _, path := range []string{
		"/", "/events", "/events?before=500000", "/events?status=READY", "/events?status=FAILED",
		"/events?entity_type=order&entity_id=4", "/events?type=invoiceChanged", "/events?subject=shop.payment", "/events?type=NoSuchType",
		"/events?since=2000-01-01T00:00&until=2000-01-02T00:00", "/events/" + id, "/events/" + id + "?payload=1",
		"/failed", "/failed?error=(2)", "/consumers", "/consumers?consumer=consumer-1&event=" + failedID,
	} {
		var times []time.Duration
		for range 7 {
			rec := httptest.NewRecorder()
			t0 := time.Now()
			h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
			times = append(times, time.Since(t0))
			require.Equal(t, http.StatusOK, rec.Code, "%s: %s", path, rec.Body.String())
		}
		first := times[0]
		slices.Sort(times)
		t.Logf("%-70s median %6.1f ms  max %6.1f ms  first %6.1f ms", path,
			ms(times[len(times)/2]), ms(times[len(times)-1]), ms(first))
	}
	// A POST's dry-run count of every FAILED event.
	t0 := time.Now()
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodPost, "/requeue", nil)
	req.PostForm = map[string][]string{"all": {"1"}}
	h.ServeHTTP(rec, req)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	t.Logf("%-70s %6.1f ms", "POST /requeue all (confirmation count)", ms(time.Since(t0)))
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
