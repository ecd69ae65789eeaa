package integration

import (
	"context"
	"encoding/base64"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/emulation"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// chromium returns the path of the installed Chromium. Without one the
// test is skipped, except in CI (CI=true), where it fails: the browser
// tests never skip there. `make deps` installs Debian's chromium.
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("no chromium on PATH: the console's browser tests need it in CI (run make deps)")
	}
	t.Skip("no chromium on PATH: run make deps to install it")
	return ""
}

// browser starts a headless Chromium with its own profile, closed when
// the test ends, whose every request carries the header authorization
// (empty: none).
func browser(t *testing.T, authorization string) context.Context {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium(t)),
		chromedp.NoSandbox, // as root, Chromium refuses to start sandboxed
		chromedp.DisableGPU,
		chromedp.Flag("disable-component-update", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1280, 900),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(actx)
	t.Cleanup(func() { cancel(); cancelAlloc() })
	_, err := chromedp.Call(ctx, network.Enable, network.EnableParams{})
	require.NoError(t, err, "start chromium")
	if authorization != "" {
		_, err = chromedp.Call(ctx, network.SetExtraHTTPHeaders, network.SetExtraHTTPHeadersParams{
			Headers: network.Headers{"Authorization": authorization}})
		require.NoError(t, err)
	}
	return ctx
}

// browserWait bounds each step of a browser test.
const browserWait = 15 * time.Second

// do runs browser steps with a deadline.
func do(t *testing.T, ctx context.Context, what string, steps ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, browserWait)
	defer cancel()
	require.NoError(t, chromedp.Do(ctx, steps...), what)
}

// value runs a browser action that returns a value, with a deadline.
func value[T any](t *testing.T, ctx context.Context, a chromedp.Action[T]) T {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, browserWait)
	defer cancel()
	v, err := chromedp.Run(ctx, a)
	require.NoError(t, err)
	return v
}

// text returns the text of the first element sel selects.
func text(t *testing.T, ctx context.Context, sel string) string {
	t.Helper()
	return value(t, ctx, chromedp.Text(chromedp.CSS(sel)))
}

// count returns how many elements sel selects.
func count(t *testing.T, ctx context.Context, sel string) int {
	t.Helper()
	return value(t, ctx, chromedp.Evaluate[int](`document.querySelectorAll(`+strconv.Quote(sel)+`).length`))
}

func basicAuth(user, password string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+password))
}

// TestConsoleInBrowser drives the console of a running publisher in
// headless Chromium: every page loads, a filter narrows the events, an
// event opens with its payload on request, and a FAILED event requeued
// from the browser is published. A second publisher's read-only console
// offers no action, and a request without credentials is refused.
func TestConsoleInBrowser(t *testing.T) {
	t.Parallel()
	b := setup(t)
	tx, err := b.db.Begin()
	require.NoError(t, err)
	ids, err := b.w.Write(t.Context(), tx,
		outbox.Event{EntityType: "order", EntityID: "7", Type: "OrderCreated", Subject: b.prefix + ".order.created",
			Data: map[string]any{"order": 7, "customer": map[string]any{"email": "eve@example.com"}}},
		outbox.Event{EntityType: "order", EntityID: "7", Type: "OrderPaid", Subject: b.prefix + ".order.paid",
			Data: map[string]any{"order": 7, "amount": "19.90"}},
		outbox.Event{EntityType: "order", EntityID: "8", Type: "OrderCreated", Subject: b.prefix + ".order.created",
			Data: map[string]any{"order": 8}},
	)
	require.NoError(t, err)
	require.NoError(t, tx.Commit())
	failed := ids[0].String()
	// The first event was refused for good; the second waits behind it.
	b.db.MustExec(`UPDATE events SET event_status = 'FAILED', attempts = 10,
		last_error = 'nats: no response from stream (the stream was missing then)' WHERE event_id = $1`, failed)
	screenshots := os.Getenv("OUTBOX_CONSOLE_SCREENSHOTS")
	if screenshots != "" {
		writeScreenshotLoad(t, b)
	}

	p := startProcess(t, "publisher", append([]string{"run", "--database-url", b.db.DSN, "--nats-url", testenv.NATSURL(),
		"--http-addr", "127.0.0.1:0", "--console", "--console-actions", "--console-user", "ops",
		"--console-mask", "customer.email"}, fastFlags...),
		[]string{"OUTBOX_CONSOLE_PASSWORD=pw"})
	base := httpBase(t, p) + "/console/"
	testenv.Eventually(t, 20*time.Second, func() bool { return b.status(t, ids[2].String()) == "SUCCESS" },
		"the unblocked entity's event published")

	// Without credentials: 401.
	code, _ := get(t, base)
	require.Equal(t, http.StatusUnauthorized, code)

	ctx := browser(t, basicAuth("ops", "pw"))
	css := func(s string) chromedp.CSS { return chromedp.CSS(s) }
	do(t, ctx, "overview", chromedp.Navigate(base), chromedp.WaitVisible(css(`svg.chart`)))
	main := text(t, ctx, "main")
	require.Contains(t, main, "FAILED")
	require.Contains(t, main, "order/7", "the blocked entity")
	shoot(t, ctx, screenshots, "overview")

	// Filter the events to the entity's FAILED ones: only the refused one
	// is listed.
	do(t, ctx, "filter events", chromedp.Navigate(base+"events"), chromedp.WaitVisible(css(`form.filters`)),
		chromedp.SetValue(css(`select[name=status]`), "FAILED"),
		chromedp.SetValue(css(`input[name=entity_type]`), "order"),
		chromedp.SetValue(css(`input[name=entity_id]`), "7"),
		chromedp.Submit(css(`form.filters`)),
		chromedp.WaitVisible(css(`table.events`)))
	require.Equal(t, 1, count(t, ctx, "table.events tbody tr"), "FAILED events listed")
	require.Contains(t, text(t, ctx, "table.events"), failed[:13])

	// Open it; the payload shows on request, masked.
	do(t, ctx, "open the event", chromedp.Click(css(`table.events tbody a`)), chromedp.WaitVisible(css(`#show-payload`)))
	main = text(t, ctx, "main")
	require.Contains(t, main, "no response from stream")
	require.Contains(t, main, "OrderPaid", "the entity's history")
	require.NotContains(t, main, "eve@example.com")
	do(t, ctx, "show the payload", chromedp.Click(css(`#show-payload`)), chromedp.WaitVisible(css(`#payload`)))
	require.Contains(t, text(t, ctx, "#payload"), `"email": "***"`)
	shoot(t, ctx, screenshots, "event")

	// The FAILED page lists it; requeue it from its page, confirm, and it
	// is published.
	do(t, ctx, "failed page", chromedp.Navigate(base+"failed"), chromedp.WaitVisible(css(`#requeue-selected`)))
	require.Contains(t, text(t, ctx, "main"), "no response from stream")
	shoot(t, ctx, screenshots, "failed")
	do(t, ctx, "requeue", chromedp.Navigate(base+"events/"+failed), chromedp.Click(css(`form.inline button`)),
		chromedp.WaitVisible(css(`#confirm`)))
	require.Equal(t, "Requeue 1 event?", strings.TrimSpace(text(t, ctx, "h1")))
	shoot(t, ctx, screenshots, "confirm")
	do(t, ctx, "confirm", chromedp.Click(css(`#confirm`)), chromedp.WaitVisible(css(`.flash`)))
	require.Equal(t, "Requeued 1 event.", text(t, ctx, ".flash"))
	testenv.Eventually(t, 20*time.Second, func() bool {
		return b.status(t, failed) == "SUCCESS" && b.status(t, ids[1].String()) == "SUCCESS"
	}, "the requeued event and the one behind it published")
	do(t, ctx, "see it delivered", chromedp.Reload(), chromedp.WaitVisible(css(`h1 .st-success`)))
	require.Contains(t, p.Logs(), `msg="console action" action=requeue who=ops`)

	// The overview refreshes itself: a new FAILED event shows without a
	// reload.
	failedCard := `a.card[href$="failed"] .v`
	do(t, ctx, "overview again", chromedp.Navigate(base), chromedp.WaitVisible(css(failedCard)))
	before := text(t, ctx, failedCard)
	b.db.MustExec(`UPDATE events SET event_status = 'FAILED', last_error = 'refused later' WHERE event_id = $1`, ids[2])
	testenv.Eventually(t, 20*time.Second, func() bool { return text(t, ctx, failedCard) != before },
		"the overview's FAILED count refreshed from %s", before)
	b.db.MustExec(`UPDATE events SET event_status = 'SUCCESS', last_error = NULL WHERE event_id = $1`, ids[2])

	for _, pg := range []struct{ path, h1 string }{{"replay", "Replay"}, {"consumers", "Consumers"}} {
		do(t, ctx, pg.path, chromedp.Navigate(base+pg.path), chromedp.WaitVisible(css(`h1`)))
		require.True(t, strings.HasPrefix(text(t, ctx, "h1"), pg.h1), "%s page", pg.path)
	}
	do(t, ctx, "replay count", chromedp.Navigate(base+"replay"),
		chromedp.SetValue(css(`input[name=entity_type]`), "order"),
		chromedp.SetValue(css(`input[name=entity_id]`), "7"),
		chromedp.Click(css(`#count`)), chromedp.WaitVisible(css(`#confirm`)))
	require.Equal(t, "Replay 2 events?", strings.TrimSpace(text(t, ctx, "h1")))
	do(t, ctx, "events page", chromedp.Navigate(base+"events"), chromedp.WaitVisible(css(`table.events`)))
	shoot(t, ctx, screenshots, "events")
	if screenshots != "" {
		_, err := chromedp.Call(ctx, emulation.SetEmulatedMedia, emulation.SetEmulatedMediaParams{
			Features: []*emulation.MediaFeature{{Name: "prefers-color-scheme", Value: "dark"}}})
		require.NoError(t, err)
		do(t, ctx, "dark mode", chromedp.Navigate(base), chromedp.WaitVisible(css(`svg.chart`)))
		shoot(t, ctx, screenshots, "overview-dark")
	}

	// A read-only console (a standby publisher's, behind a token) offers
	// no action.
	ro := startProcess(t, "read-only", append([]string{"run", "--database-url", b.db.DSN, "--nats-url", testenv.NATSURL(),
		"--http-addr", "127.0.0.1:0", "--console", "--console-token", "t0ken"}, fastFlags...), nil)
	roBase := httpBase(t, ro) + "/console/"
	b.db.MustExec(`UPDATE events SET event_status = 'FAILED', last_error = 'refused again' WHERE event_id = $1`, failed)
	rctx := browser(t, "Bearer t0ken")
	do(t, rctx, "read-only failed page", chromedp.Navigate(roBase+"failed"), chromedp.WaitVisible(css(`h1`)))
	require.Contains(t, text(t, rctx, "main"), "refused again")
	require.Zero(t, count(t, rctx, "form[method=post]"), "forms that POST on a read-only console")
	do(t, rctx, "read-only event page", chromedp.Navigate(roBase+"events/"+failed), chromedp.WaitVisible(css(`h1`)))
	require.Zero(t, count(t, rctx, "form[method=post]"))
	code, _ = get(t, roBase)
	require.Equal(t, http.StatusUnauthorized, code)
}

// shoot saves a screenshot of the page as dir/console-name.png when dir
// is set.
func shoot(t *testing.T, ctx context.Context, dir, name string) {
	t.Helper()
	if dir == "" {
		return
	}
	shot := chromedp.FullScreenshot(100)
	if name == "events" {
		shot = chromedp.CaptureScreenshot() // the window, not 50 rows
	}
	png := value(t, ctx, shot)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "console-"+name+".png"), png, 0o644))
}

// writeScreenshotLoad writes some traffic so the screenshots show a
// chart, several entities and a few FAILED events.
func writeScreenshotLoad(t *testing.T, b *bundle) {
	t.Helper()
	b.db.MustExec(`INSERT INTO events (event_id, event_target, event_type, entity_type, entity_id, event_data,
			event_status, created_at, published_at)
		SELECT gen_random_uuid(), $1 || '.order.updated', 'OrderUpdated', 'order', (100 + i % 40)::text,
			convert_to('{"order":' || i || '}', 'UTF8'), 'SUCCESS',
			now() - make_interval(secs => i * 2), now() - make_interval(secs => i * 2 - 1)
		FROM generate_series(1, 1700) i ORDER BY i DESC`, b.prefix)
	b.db.MustExec(`INSERT INTO events (event_id, event_target, event_type, entity_type, entity_id, event_data,
			event_status, attempts, last_error)
		SELECT gen_random_uuid(), 'billing.invoice.issued', 'InvoiceIssued', 'invoice', i::text,
			convert_to('{"invoice":' || i || '}', 'UTF8'), 'FAILED', 10,
			'nats: no response from stream: no JetStream stream covers subject "billing.invoice.issued"'
		FROM generate_series(1, 4) i`)
}
