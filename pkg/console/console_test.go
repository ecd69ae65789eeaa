package console_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/console"
	"github.com/pgnats/outbox/pkg/outbox"
)

// fixture is a console over a test schema holding a few events.
type fixture struct {
	db   *testenv.DB
	srv  *httptest.Server
	logs *testenv.SyncBuffer
	ids  []string // in seq order
}

const base = "/ops/outbox/"

// newFixture writes the events: seq 1-3 order/1 (1 SUCCESS, 2 FAILED,
// 3 READY), seq 4 order/2 FAILED, seq 5 invoice/9 with a binary payload.
func newFixture(t *testing.T, cfg console.Config) *fixture {
	t.Helper()
	db := testenv.NewDB(t)
	f := &fixture{db: db, logs: &testenv.SyncBuffer{}}
	tx, err := db.Begin()
	require.NoError(t, err)
	w, err := outbox.NewWriter(outbox.Config{})
	require.NoError(t, err)
	ids, err := w.Write(t.Context(), tx,
		outbox.Event{EntityType: "order", EntityID: "1", Type: "OrderCreated", Subject: "shop.order.created",
			Data: map[string]any{"customer": map[string]any{"email": "a@example.com", "name": "Ann"}, "total": 12.50}},
		outbox.Event{EntityType: "order", EntityID: "1", Type: "OrderPaid", Subject: "shop.order.paid", Data: map[string]any{"ok": true},
			Headers: map[string]string{"tenant": "acme"}},
		outbox.Event{EntityType: "order", EntityID: "1", Type: "OrderShipped", Subject: "shop.order.shipped", Data: map[string]any{}},
		outbox.Event{EntityType: "order", EntityID: "2", Type: "OrderCreated", Subject: "shop.order.created", Data: map[string]any{}},
		outbox.Event{EntityType: "invoice", EntityID: "9", Type: "InvoicePdf", Subject: "shop.invoice.pdf",
			Data: []byte{0, 1, 2, 0xff}, ContentType: "application/pdf"},
	)
	require.NoError(t, err)
	require.NoError(t, tx.Commit())
	for _, id := range ids {
		f.ids = append(f.ids, id.String())
	}
	db.MustExec(`UPDATE events SET event_status = 'SUCCESS', published_at = now() WHERE seq IN (1, 5)`)
	db.MustExec(`UPDATE events SET event_status = 'FAILED', attempts = 10, last_error = 'no stream matches subject' WHERE seq = 2`)
	db.MustExec(`UPDATE events SET event_status = 'FAILED', attempts = 1, last_error = 'message too large' WHERE seq = 4`)

	cfg.DB = db.DB.DB
	cfg.BasePath = base
	cfg.Logger = slog.New(slog.NewTextHandler(f.logs, nil))
	h, err := console.New(cfg)
	require.NoError(t, err)
	mux := http.NewServeMux()
	mux.Handle(base, h)
	f.srv = httptest.NewServer(mux)
	t.Cleanup(f.srv.Close)
	return f
}

func allowAll(*http.Request, console.Action) error { return nil }

// client follows no redirects.
var client = &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

func (f *fixture) get(t *testing.T, path string) (int, string) {
	t.Helper()
	resp, err := client.Get(f.srv.URL + base + path)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(b)
}

func (f *fixture) post(t *testing.T, path string, form url.Values, hdr ...string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, f.srv.URL+base+path, strings.NewReader(form.Encode()))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth("alice", "x")
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := client.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp, string(b)
}

func TestPagesRender(t *testing.T) {
	t.Parallel()
	f := newFixture(t, console.Config{})
	for _, tc := range []struct {
		path string
		code int
		want []string
	}{
		{"", 200, []string{"Overview", `<svg class="chart"`, "No publisher holds the leader lock", "order/2", `href="/ops/outbox/failed"`}},
		{"events", 200, []string{f.ids[0], f.ids[4], "shop.order.shipped"}},
		{"events?status=failed", 200, []string{f.ids[1], f.ids[3]}},
		{"events?entity_type=order&entity_id=1", 200, []string{f.ids[0], f.ids[2]}},
		{"events?type=InvoicePdf", 200, []string{f.ids[4]}},
		{"events?subject=shop.order.s", 200, []string{f.ids[2]}},
		{"events?since=2000-01-01T00:00&until=2999-01-01T00:00", 200, []string{f.ids[0]}},
		{"events?since=2999-01-01T00:00", 200, []string{"No events match"}},
		{"events?until=2000-01-01T00:00", 200, []string{"No events match"}},
		{"events?status=DONE", 400, []string{"use READY, SUCCESS or FAILED"}},
		{"events?since=yesterday", 400, []string{"is not a time"}},
		{"events?before=x", 400, []string{"not a seq"}},
		{"events?id=nope", 400, []string{"is not an event id"}},
		{"events/" + f.ids[1], 200, []string{"no stream matches subject", "OrderShipped", "Show the payload", "tenant", "acme"}},
		{"events/" + f.ids[4], 200, []string{"application/pdf", "4 bytes"}},
		{"events/" + f.ids[4] + "?payload=1", 200, []string{"00 01 02 ff", "binary: hex dump"}},
		{"events/not-a-uuid", 400, []string{"is not an event id"}},
		{"events/00000000-0000-0000-0000-000000000000", 404, []string{"No event has the id"}},
		{"failed", 200, []string{"no stream matches subject", "message too large", "order/1", f.ids[3]}},
		{"failed?error=too+large", 200, []string{f.ids[3]}},
		{"replay", 200, []string{"not allowed on this console"}},
		{"consumers", 200, []string{"No consumer has recorded a message"}},
		{"static/console.css", 200, []string{"prefers-color-scheme: dark"}},
		{"static/console.js", 200, []string{"data-refresh"}},
		{"nowhere", 404, []string{"There is no such page"}},
	} {
		code, body := f.get(t, tc.path)
		require.Equal(t, tc.code, code, "GET %s: %s", tc.path, body)
		for _, w := range tc.want {
			require.Contains(t, body, w, "GET %s", tc.path)
		}
	}

	// Filters leave out what they do not match.
	_, body := f.get(t, "events?status=FAILED")
	require.NotContains(t, body, f.ids[0], "a SUCCESS event in the FAILED list")
	_, body = f.get(t, "events?type=InvoicePdf")
	require.NotContains(t, body, f.ids[0])
	_, body = f.get(t, "failed?error=too+large")
	require.NotContains(t, body, `value="`+f.ids[1]+`"`, "the other error's event in the filtered list")
	// A read-only console offers no action.
	_, body = f.get(t, "failed")
	require.NotContains(t, body, `action="/ops/outbox/requeue"`)
	require.NotContains(t, body, "Requeue")
	// The payload stays hidden until asked for.
	_, body = f.get(t, "events/"+f.ids[0])
	require.NotContains(t, body, "a@example.com")
	// Every link and asset is under the base path.
	_, body = f.get(t, "")
	for _, href := range strings.Split(body, `href="`)[1:] {
		require.True(t, strings.HasPrefix(href, base), "link outside the base path: %.60s", href)
	}
	// A path outside the base is not the console's.
	resp, err := client.Get(f.srv.URL + "/events")
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, 404, resp.StatusCode)
}

func TestEventSearchRedirects(t *testing.T) {
	t.Parallel()
	f := newFixture(t, console.Config{})
	resp, err := client.Get(f.srv.URL + base + "events?id=" + strings.ToUpper(f.ids[2]))
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusSeeOther, resp.StatusCode)
	require.Equal(t, base+"events/"+f.ids[2], resp.Header.Get("Location"))
}

func TestKeysetPaging(t *testing.T) {
	t.Parallel()
	f := newFixture(t, console.Config{PageSize: 2})
	_, body := f.get(t, "events")
	require.Contains(t, body, f.ids[4])
	require.Contains(t, body, f.ids[3])
	require.NotContains(t, body, f.ids[2])
	require.Contains(t, body, "before=4", "the next page starts below the last seq shown")
	_, body = f.get(t, "events?before=4")
	require.Contains(t, body, f.ids[2])
	require.Contains(t, body, f.ids[1])
	require.NotContains(t, body, f.ids[3])
	_, body = f.get(t, "events?before=2")
	require.Contains(t, body, f.ids[0])
	require.NotContains(t, body, "before=", "the last page links to no older one")
}

func TestPayloadMasked(t *testing.T) {
	t.Parallel()
	f := newFixture(t, console.Config{MaskPaths: []string{"customer.email", "$.nothing.here"}})
	code, body := f.get(t, "events/"+f.ids[0]+"?payload=1")
	require.Equal(t, 200, code)
	require.NotContains(t, body, "a@example.com")
	require.Contains(t, body, `&#34;email&#34;: &#34;***&#34;`)
	require.Contains(t, body, "Ann")
	require.Contains(t, body, "12.5")
	require.Contains(t, body, "1 value masked")
}

func TestRequeueReadOnlyAndRefused(t *testing.T) {
	t.Parallel()
	f := newFixture(t, console.Config{})
	resp, body := f.post(t, "requeue", url.Values{"id": {f.ids[1]}, "confirm": {"1"}})
	require.Equal(t, http.StatusForbidden, resp.StatusCode, body)
	require.Contains(t, body, "read-only")

	g := newFixture(t, console.Config{Authorize: func(_ *http.Request, a console.Action) error {
		return errors.New("only the on-call engineer may " + string(a))
	}})
	resp, body = g.post(t, "requeue", url.Values{"id": {g.ids[1]}, "confirm": {"1"}})
	require.Equal(t, http.StatusForbidden, resp.StatusCode)
	require.Contains(t, body, "only the on-call engineer may requeue")
	require.Equal(t, 2, g.db.Count(t, "FAILED"), "a refused requeue changed events")
}

func TestRequeueConfirmsThenMoves(t *testing.T) {
	t.Parallel()
	f := newFixture(t, console.Config{Authorize: allowAll})
	_, body := f.get(t, "failed")
	require.Contains(t, body, `action="/ops/outbox/requeue"`)
	require.Contains(t, body, "Requeue all FAILED")
	require.Contains(t, body, `name="entity_id" value="2"`, "a blocked entity's requeue button")

	// No selection: an error, nothing moved.
	resp, body := f.post(t, "requeue", url.Values{})
	require.Equal(t, http.StatusBadRequest, resp.StatusCode, body)
	resp, body = f.post(t, "requeue", url.Values{"id": {"nope"}})
	require.Equal(t, http.StatusBadRequest, resp.StatusCode, body)
	resp, body = f.post(t, "requeue", url.Values{"entity_type": {"order"}})
	require.Equal(t, http.StatusBadRequest, resp.StatusCode, body)

	// A selection, and a blocked entity, are counted before they move.
	resp, body = f.post(t, "requeue", url.Values{"id": {f.ids[1], strings.ToUpper(f.ids[3])}})
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Contains(t, body, "Requeue 2 events?")
	resp, body = f.post(t, "requeue", url.Values{"entity_type": {"order"}, "entity_id": {"2"}})
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Contains(t, body, "Requeue 1 event?")

	// The first POST asks, with the count, and moves nothing.
	resp, body = f.post(t, "requeue", url.Values{"error": {"TOO LARGE"}})
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Contains(t, body, "Requeue 1 event?")
	require.Contains(t, body, `name="confirm" value="1"`)
	require.Equal(t, 2, f.db.Count(t, "FAILED"))

	// A POST from another site is refused before anything is read.
	resp, _ = f.post(t, "requeue", url.Values{"error": {"too large"}, "confirm": {"1"}}, "Sec-Fetch-Site", "cross-site")
	require.Equal(t, http.StatusForbidden, resp.StatusCode)
	require.Equal(t, 2, f.db.Count(t, "FAILED"))

	resp, _ = f.post(t, "requeue", url.Values{"error": {"too large"}, "confirm": {"1"}})
	require.Equal(t, http.StatusSeeOther, resp.StatusCode)
	require.True(t, strings.HasPrefix(resp.Header.Get("Location"), base+"failed?msg="), resp.Header.Get("Location"))
	require.Equal(t, 1, f.db.Count(t, "FAILED"))
	require.Equal(t, "READY", status(t, f, f.ids[3]))
	require.Contains(t, f.logs.String(), `msg="console action" action=requeue who=alice`)
	require.Contains(t, f.logs.String(), "requeued=1")

	// One event from its page goes back to its page.
	resp, _ = f.post(t, "requeue", url.Values{"id": {f.ids[1]}, "back": {"event"}, "confirm": {"1"}})
	require.Equal(t, http.StatusSeeOther, resp.StatusCode)
	require.True(t, strings.HasPrefix(resp.Header.Get("Location"), base+"events/"+f.ids[1]+"?msg="))
	require.Equal(t, 0, f.db.Count(t, "FAILED"))
}

func TestRequeueAllChunked(t *testing.T) {
	t.Parallel()
	f := newFixture(t, console.Config{Authorize: allowAll})
	f.db.MustExec(`INSERT INTO events (event_id, event_target, event_type, entity_type, entity_id, event_data, event_status, last_error)
		SELECT gen_random_uuid(), 'bulk.x', 'X', 'bulk', i::text, '{}', 'FAILED', 'gone' FROM generate_series(1, 2500) i`)
	resp, body := f.post(t, "requeue", url.Values{"all": {"1"}})
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Contains(t, body, "Requeue 2\u202f502 events?")
	resp, _ = f.post(t, "requeue", url.Values{"all": {"1"}, "confirm": {"1"}})
	require.Equal(t, http.StatusSeeOther, resp.StatusCode)
	require.Equal(t, 0, f.db.Count(t, "FAILED"))
	require.Contains(t, f.logs.String(), "requeued=2502")
}

func status(t *testing.T, f *fixture, id string) string {
	t.Helper()
	var s string
	require.NoError(t, f.db.Get(&s, `SELECT event_status FROM events WHERE event_id = $1`, id))
	return s
}

func TestReplay(t *testing.T) {
	t.Parallel()
	_, js := testenv.NATS(t)
	stream, prefix := testenv.Stream(t, js)
	var conn jetstream.JetStream
	f := newFixture(t, console.Config{Authorize: allowAll, JetStream: func() jetstream.JetStream { return conn }})
	f.db.MustExec(`UPDATE events SET event_target = $1 || '.' || event_target`, prefix)

	resp, body := f.post(t, "replay", url.Values{})
	require.Equal(t, http.StatusBadRequest, resp.StatusCode, body)
	resp, body = f.post(t, "replay", url.Values{"from_seq": {"x"}})
	require.Equal(t, http.StatusBadRequest, resp.StatusCode, body)

	resp, body = f.post(t, "replay", url.Values{"entity_type": {"order"}, "entity_id": {"1"}})
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Contains(t, body, "Replay 1 event?")
	require.Contains(t, body, "No NATS connection")
	resp, _ = f.post(t, "replay", url.Values{"entity_type": {"order"}, "entity_id": {"1"}, "confirm": {"1"}})
	require.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)

	conn = js
	resp, body = f.post(t, "replay", url.Values{"from_seq": {"1"}, "to_seq": {"5"}})
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Contains(t, body, "Replay 2 events?")
	resp, _ = f.post(t, "replay", url.Values{"from_seq": {"1"}, "to_seq": {"5"}, "confirm": {"1"}})
	require.Equal(t, http.StatusSeeOther, resp.StatusCode)
	testenv.Eventually(t, 10*time.Second, func() bool {
		info, err := stream.Info(context.Background())
		return err == nil && info.State.Msgs == 2
	}, "both SUCCESS events replayed to the stream")
	require.Contains(t, f.logs.String(), `action=replay who=alice`)
	testenv.Eventually(t, 10*time.Second, func() bool { return strings.Contains(f.logs.String(), "console replay done") }, "replay logged")
}

func TestConsumers(t *testing.T) {
	t.Parallel()
	f := newFixture(t, console.Config{})
	f.db.MustExec(`INSERT INTO processed_message (consumer_id, message_id) VALUES ('billing', $1), ('billing', $2), ('mailer', $1)`, f.ids[0], f.ids[1])
	code, body := f.get(t, "consumers")
	require.Equal(t, 200, code)
	require.Contains(t, body, "billing")
	require.Contains(t, body, "mailer")
	_, body = f.get(t, "consumers?consumer=mailer&event="+f.ids[0])
	require.Contains(t, body, "Yes: <b>mailer</b> processed")
	_, body = f.get(t, "consumers?consumer=mailer&event="+f.ids[1])
	require.Contains(t, body, "No: <b>mailer</b> has no record")

	g := newFixture(t, console.Config{ProcessedTable: "nowhere"})
	code, body = g.get(t, "consumers")
	require.Equal(t, 200, code)
	require.Contains(t, body, "does not exist")
}

func TestConfigErrors(t *testing.T) {
	t.Parallel()
	_, err := console.New(console.Config{})
	require.ErrorContains(t, err, "DB is required")
	db := testenv.NewDB(t)
	_, err = console.New(console.Config{DB: db.DB.DB, BasePath: "/console"})
	require.ErrorContains(t, err, "must start and end with a slash")
	_, err = console.New(console.Config{DB: db.DB.DB, Table: "bad name"})
	require.ErrorContains(t, err, "invalid table name")
	_, err = console.New(console.Config{DB: db.DB.DB, MaskPaths: []string{"$"}})
	require.ErrorContains(t, err, "empty mask path")
}

func TestMissingTable(t *testing.T) {
	t.Parallel()
	db := testenv.NewDB(t)
	h, err := console.New(console.Config{DB: db.DB.DB, Table: "absent"})
	require.NoError(t, err)
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil))
	require.Equal(t, http.StatusInternalServerError, rec.Code)
	require.Contains(t, rec.Body.String(), "does not exist")
}

func TestTraceLinkAndReplicas(t *testing.T) {
	t.Parallel()
	f := newFixture(t, console.Config{TraceURL: "https://traces.example/trace/{trace_id}"})
	f.db.MustExec(`UPDATE events SET headers = '{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}' WHERE seq = 1`)
	_, body := f.get(t, "events/"+f.ids[0])
	require.Contains(t, body, `href="https://traces.example/trace/4bf92f3577b34da6a3ce929d0e0e4736"`)

	f.db.MustExec(`INSERT INTO events_replicas (replica_id, partitions) VALUES ('replica-a', 4)`)
	f.db.MustExec(`INSERT INTO events_leases (part, partitions, owner, expires_at) VALUES
		(0, 4, 'replica-a', now() + interval '1 minute'), (2, 4, 'replica-a', now() + interval '1 minute')`)
	_, body = f.get(t, "")
	require.Contains(t, body, "replica-a")
	require.Contains(t, body, "2: 0, 2")
}
