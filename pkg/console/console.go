// Package console is a web console for an outbox events table: it shows
// whether events flow, what is stuck and why, and, when allowed, requeues
// FAILED events and replays published ones. It reads the same status
// queries and calls the same requeue and replay code as the publisher's
// status, requeue and replay commands.
//
// New returns an http.Handler to mount under a path of a service's own
// mux, behind its own authentication:
//
//	h, err := console.New(console.Config{DB: db, BasePath: "/console/",
//		Authorize: func(r *http.Request, a console.Action) error { return nil }})
//	mux.Handle("/console/", h)
//
// The pages are rendered on the server with html/template; a little plain
// JavaScript (embedded) refreshes the overview. Every action is a form
// that POSTs and redirects with 303, so the console works without
// JavaScript. POSTs from another origin are refused
// (http.CrossOriginProtection). The handler does no authentication of its
// own: mount it behind some (the publisher's --console does).
package console

import (
	"cmp"
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgnats/outbox/pkg/outbox"
	"github.com/pgnats/outbox/schema"
)

// Action is something the console changes. Authorize is asked about each
// before the console offers it and before it does it.
type Action string

// The console's actions.
const (
	// ActionRequeue puts FAILED events back to READY.
	ActionRequeue Action = "requeue"
	// ActionReplay publishes SUCCESS events again.
	ActionReplay Action = "replay"
	// ActionPause pauses and resumes publishing (the table's pause
	// switch, read by every publisher of the table).
	ActionPause Action = "pause"
)

// Config configures the console. Only DB is required.
type Config struct {
	// DB is the database of the events table. Required.
	DB *sql.DB
	// Table is the events table, optionally schema-qualified. Default
	// "events".
	Table string
	// ProcessedTable is the table pkg/dedup records handled messages in,
	// read by the Consumers page. Default "processed_message".
	ProcessedTable string
	// BasePath is the path the handler is mounted under, with a trailing
	// slash: every link and redirect starts with it, and requests must
	// too. Default "/". Behind a reverse proxy that strips a prefix, give
	// the path the browser sees.
	BasePath string
	// Authorize says whether request r may do action a: nil allows it,
	// an error refuses it (403, with the error's text). It is asked
	// before an action is offered on a page, so a refused action does not
	// appear. A nil Authorize makes the console read-only.
	Authorize func(r *http.Request, a Action) error
	// Who names the person behind r in the log line of each action.
	// Default: the basic-auth user name, else "anonymous".
	Who func(r *http.Request) string
	// JetStream returns the connection replays publish on; nil, or a nil
	// result, leaves only the replay's dry-run count. It is called for
	// each replay, so it may return the publisher's current connection.
	JetStream func() jetstream.JetStream
	// Logger receives a line for every action (who, what, how many) and
	// for errors. Default slog.Default().
	Logger *slog.Logger
	// MaskPaths are JSON paths, dot-separated ("customer.email",
	// "cards.*.number": * matches every key or array element), whose
	// values are replaced by "***" wherever the console shows a JSON
	// payload. Payloads that are not JSON are shown as they are.
	MaskPaths []string
	// TraceURL, when set, links an event's trace id (from its traceparent
	// header) to this URL with {trace_id} replaced, e.g.
	// "https://jaeger.example/trace/{trace_id}".
	TraceURL string
	// PageSize is how many events a list shows. Default 50.
	PageSize int
	// Refresh is how often the overview refreshes itself. Default 5s.
	Refresh time.Duration
}

//go:embed templates/*.html
var templateFS embed.FS

//go:embed static
var staticFS embed.FS

// Handler is the console. It is safe for concurrent use.
type Handler struct {
	cfg     Config
	table   schema.Name
	proc    schema.Name
	history *outbox.Writer
	pages   map[string]*template.Template
	mux     http.Handler
	log     *slog.Logger
	masks   [][]string

	chartMu   sync.Mutex
	chartAt   time.Time
	chartData *chart
}

// New returns the console for cfg. It fails for a missing DB, an invalid
// table name or a base path without leading and trailing slashes.
func New(cfg Config) (*Handler, error) {
	if cfg.DB == nil {
		return nil, errors.New("console: a DB is required")
	}
	cfg.Table = cmp.Or(cfg.Table, schema.DefaultEvents)
	cfg.ProcessedTable = cmp.Or(cfg.ProcessedTable, schema.DefaultProcessed)
	cfg.BasePath = cmp.Or(cfg.BasePath, "/")
	cfg.PageSize = cmp.Or(cfg.PageSize, 50)
	cfg.Refresh = cmp.Or(cfg.Refresh, 5*time.Second)
	if !strings.HasPrefix(cfg.BasePath, "/") || !strings.HasSuffix(cfg.BasePath, "/") {
		return nil, fmt.Errorf("console: base path %q must start and end with a slash", cfg.BasePath)
	}
	h := &Handler{cfg: cfg, log: cmp.Or(cfg.Logger, slog.Default())}
	var err error
	if h.table, err = schema.ParseName(cfg.Table); err != nil {
		return nil, fmt.Errorf("console: %w", err)
	}
	if h.proc, err = schema.ParseName(cfg.ProcessedTable); err != nil {
		return nil, fmt.Errorf("console: %w", err)
	}
	if h.history, err = outbox.NewWriter(outbox.Config{Table: cfg.Table}); err != nil {
		return nil, fmt.Errorf("console: %w", err)
	}
	for _, p := range cfg.MaskPaths {
		if p = strings.TrimPrefix(strings.TrimPrefix(p, "$"), "."); p == "" {
			return nil, errors.New("console: an empty mask path")
		}
		h.masks = append(h.masks, strings.Split(p, "."))
	}
	if err := h.parseTemplates(); err != nil {
		return nil, err
	}

	mux := http.NewServeMux()
	static, _ := fs.Sub(staticFS, "static")
	mux.Handle("GET /static/", http.StripPrefix("/static/", staticCache(http.FileServerFS(static))))
	mux.HandleFunc("GET /{$}", h.overview)
	mux.HandleFunc("GET /events", h.events)
	mux.HandleFunc("GET /events/{id}", h.event)
	mux.HandleFunc("GET /failed", h.failed)
	mux.HandleFunc("POST /requeue", h.requeue)
	mux.HandleFunc("POST /pause", h.setPause(true))
	mux.HandleFunc("POST /resume", h.setPause(false))
	mux.HandleFunc("GET /replay", h.replayForm)
	mux.HandleFunc("POST /replay", h.replay)
	mux.HandleFunc("GET /consumers", h.consumers)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		h.fail(w, r, http.StatusNotFound, "There is no such page.")
	})
	prefix := strings.TrimSuffix(cfg.BasePath, "/")
	h.mux = http.NewCrossOriginProtection().Handler(http.StripPrefix(prefix, mux))
	return h, nil
}

// ServeHTTP serves the console's pages under Config.BasePath.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("X-Frame-Options", "DENY")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("Referrer-Policy", "same-origin")
	w.Header().Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'; form-action 'self'")
	h.mux.ServeHTTP(w, r)
}

func staticCache(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "public, max-age=300")
		next.ServeHTTP(w, r)
	})
}

// allowed reports whether r may do a.
func (h *Handler) allowed(r *http.Request, a Action) bool {
	return h.cfg.Authorize != nil && h.cfg.Authorize(r, a) == nil
}

// authorize answers a refused action with 403 and returns false.
func (h *Handler) authorize(w http.ResponseWriter, r *http.Request, a Action) bool {
	if h.cfg.Authorize == nil {
		h.fail(w, r, http.StatusForbidden, "This console is read-only.")
		return false
	}
	if err := h.cfg.Authorize(r, a); err != nil {
		h.fail(w, r, http.StatusForbidden, "Not allowed: "+err.Error())
		return false
	}
	return true
}

// who names the person behind r for the log.
func (h *Handler) who(r *http.Request) string {
	if h.cfg.Who != nil {
		return h.cfg.Who(r)
	}
	if u, _, ok := r.BasicAuth(); ok && u != "" {
		return u
	}
	return "anonymous"
}

// queryTimeout bounds the queries of one page.
const queryTimeout = 10 * time.Second

func (h *Handler) ctx(r *http.Request) (context.Context, context.CancelFunc) {
	return context.WithTimeout(r.Context(), queryTimeout)
}

// redirect answers an action with 303 to path (relative to the base) with
// a message shown on the page.
func (h *Handler) redirect(w http.ResponseWriter, r *http.Request, path, msg string) {
	u := h.cfg.BasePath + path
	if msg != "" {
		sep := "?"
		if strings.Contains(u, "?") {
			sep = "&"
		}
		u += sep + "msg=" + urlQueryEscape(msg)
	}
	http.Redirect(w, r, u, http.StatusSeeOther)
}
