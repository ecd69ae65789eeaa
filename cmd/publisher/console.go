package main

import (
	"crypto/sha256"
	"crypto/subtle"
	"database/sql"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync/atomic"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgnats/outbox/pkg/console"
)

// pathConsole is where --console serves the web console.
const pathConsole = "/console/"

// consoleOptions are the flags of the web console.
type consoleOptions struct {
	enabled  bool
	actions  bool
	user     string
	password string
	token    string
	insecure bool
	mask     string
	traceURL string
}

func (o *consoleOptions) register(c *command) {
	c.Bool(&o.enabled, "console", false, "serve the web console on --http-addr under "+pathConsole+" (read-only unless --console-actions); it needs --console-user and --console-password, or --console-token, or --console-insecure")
	c.Bool(&o.actions, "console-actions", false, "with --console: allow requeueing FAILED events and replaying SUCCESS events from the console")
	c.String(&o.user, "console-user", "", "with --console: user name of HTTP basic authentication (with --console-password)")
	c.String(&o.password, "console-password", "", "with --console: password of HTTP basic authentication")
	c.String(&o.token, "console-token", "", "with --console: bearer token accepted instead of, or besides, the user and password (Authorization: Bearer TOKEN)")
	c.Bool(&o.insecure, "console-insecure", false, "with --console: serve it without authentication; allowed only when --http-addr is a loopback address (127.0.0.1:9090, [::1]:9090, localhost:9090)")
	c.String(&o.mask, "console-mask", "", "with --console: comma-separated JSON paths whose payload values the console shows as *** (customer.email,cards.*.number)")
	c.String(&o.traceURL, "console-trace-url", "", "with --console: link an event's trace id to this URL, {trace_id} replaced (https://jaeger.example/trace/{trace_id})")
}

// check reports flags that do not fit together, given --http-addr.
func (o *consoleOptions) check(httpAddr string) error {
	if !o.enabled {
		if o.actions || o.user != "" || o.password != "" || o.token != "" || o.insecure {
			return usagef("run: the --console-* flags need --console")
		}
		return nil
	}
	if httpAddr == "" {
		return usagef("run: --console needs --http-addr (the console is served there under %s)", pathConsole)
	}
	if (o.user == "") != (o.password == "") {
		return usagef("run: give --console-user and --console-password together")
	}
	authenticated := o.user != "" || o.token != ""
	switch {
	case o.insecure && authenticated:
		return usagef("run: --console-insecure turns authentication off: drop it, or drop --console-user, --console-password and --console-token")
	case o.insecure && !isLoopback(httpAddr):
		return usagef("run: --console-insecure is allowed only on a loopback --http-addr (127.0.0.1:PORT), not %q: anyone who reaches it could use the console", httpAddr)
	case !o.insecure && !authenticated:
		return usagef("run: --console needs authentication: --console-user and --console-password, or --console-token (or --console-insecure on a loopback --http-addr)")
	}
	return nil
}

// isLoopback reports whether the host of addr is a loopback address or
// localhost. An empty host listens on every interface: not loopback.
func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil || host == "" {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// consoleServer serves the console once the database is connected, behind
// the authentication the flags ask for.
type consoleServer struct {
	o       consoleOptions
	handler atomic.Pointer[console.Handler]
	log     *slog.Logger
}

// start builds the console over db; js gives the current NATS connection
// for replays.
func (s *consoleServer) start(db *sql.DB, table, processed string, js func() jetstream.JetStream) error {
	cfg := console.Config{DB: db, Table: table, ProcessedTable: processed, BasePath: pathConsole,
		Logger: s.log, JetStream: js, TraceURL: s.o.traceURL, Who: s.who}
	for _, p := range strings.Split(s.o.mask, ",") {
		if p = strings.TrimSpace(p); p != "" {
			cfg.MaskPaths = append(cfg.MaskPaths, p)
		}
	}
	if s.o.actions {
		cfg.Authorize = func(*http.Request, console.Action) error { return nil }
	}
	h, err := console.New(cfg)
	if err != nil {
		return usageError{err}
	}
	s.handler.Store(h)
	return nil
}

// who names the person behind r in the console's action log.
func (s *consoleServer) who(r *http.Request) string {
	if u, _, ok := r.BasicAuth(); ok {
		return u
	}
	if _, ok := bearer(r); ok {
		return "bearer-token"
	}
	return "anonymous"
}

func bearer(r *http.Request) (string, bool) {
	scheme, tok, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	return strings.TrimSpace(tok), ok && strings.EqualFold(scheme, "Bearer")
}

// same compares secrets in constant time (for equal-length hashes).
func same(got, want string) bool {
	g, w := sha256.Sum256([]byte(got)), sha256.Sum256([]byte(want))
	return subtle.ConstantTimeCompare(g[:], w[:]) == 1
}

// authenticated reports whether r carries the credentials the flags set.
func (s *consoleServer) authenticated(r *http.Request) bool {
	if s.o.insecure {
		return true
	}
	if u, p, ok := r.BasicAuth(); ok && s.o.user != "" {
		// Both compared, whatever the first gives, so the time does not
		// tell which was wrong.
		uok, pok := same(u, s.o.user), same(p, s.o.password)
		if uok && pok {
			return true
		}
	}
	if tok, ok := bearer(r); ok && s.o.token != "" && same(tok, s.o.token) {
		return true
	}
	return false
}

func (s *consoleServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !s.authenticated(r) {
		if s.o.user != "" {
			w.Header().Set("WWW-Authenticate", `Basic realm="outbox console", charset="UTF-8"`)
		} else {
			w.Header().Set("WWW-Authenticate", `Bearer realm="outbox console"`)
		}
		http.Error(w, "authentication required", http.StatusUnauthorized)
		return
	}
	h := s.handler.Load()
	if h == nil {
		w.Header().Set("Retry-After", "2")
		http.Error(w, "the console starts once the database answers", http.StatusServiceUnavailable)
		return
	}
	h.ServeHTTP(w, r)
}
