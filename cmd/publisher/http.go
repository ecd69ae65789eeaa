package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/pgnats/outbox/internal/poller"
)

// The publisher's HTTP endpoints, served on --http-addr:
//
//	/metrics  Prometheus metrics (poller.Metrics, Go runtime, process)
//	/healthz  200 while the process runs, 503 while its NATS connection is
//	          closed for good (the publisher then connects again; a
//	          lasting 503 means it cannot)
//	/readyz   200 when PostgreSQL and NATS answer and the publish loop is
//	          not stuck on a database error retrying cannot fix (a missing
//	          privilege, column or table: poller.Fault), 503 otherwise; the
//	          JSON body also says whether this replica leads or stands by
const (
	pathMetrics = "/metrics"
	pathHealthz = "/healthz"
	pathReadyz  = "/readyz"
)

// probeTimeout bounds each dependency check of /readyz.
const probeTimeout = 2 * time.Second

// newRegistry returns the registry /metrics serves: the publisher's
// metrics and the Go runtime and process collectors.
func newRegistry(m *poller.Metrics) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(m, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// readiness is what /readyz checks. The publisher fills it in as it
// starts: before the database answers, /readyz says so.
type readiness struct {
	db     atomic.Pointer[sql.DB]
	nc     atomic.Pointer[nats.Conn]
	poller atomic.Pointer[poller.Poller]

	// One database ping at a time, its result shared for probeReuse: each
	// concurrent /readyz used to ping on a connection of its own, and the
	// pool, which has no limit, opened one per request (300 at once
	// exhausted PostgreSQL's max_connections for every client).
	pingMu  sync.Mutex
	pingAt  time.Time
	pingErr error
}

// probeReuse is how long one database ping answers /readyz for.
const probeReuse = time.Second

// pingDB pings db, or returns the result of a ping made less than
// probeReuse ago.
func (rd *readiness) pingDB(ctx context.Context, db *sql.DB) error {
	rd.pingMu.Lock()
	defer rd.pingMu.Unlock()
	if !rd.pingAt.IsZero() && time.Since(rd.pingAt) < probeReuse {
		return rd.pingErr
	}
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	rd.pingErr, rd.pingAt = db.PingContext(ctx), time.Now()
	return rd.pingErr
}

// Roles a replica reports on /readyz.
const (
	roleStarting = "starting" // not publishing or standing by yet
	roleLeader   = "leader"   // holds the leader lock and publishes
	roleReplica  = "replica"  // with --partitions: takes part, publishes its leased partitions
	roleStandby  = "standby"  // waits to take over
)

// readyReport is the JSON body of /readyz.
type readyReport struct {
	Ready bool   `json:"ready"`
	Role  string `json:"role"`
	// Partitions is how many partitions a replica publishes (role replica).
	Partitions int    `json:"partitions,omitempty"`
	Database   string `json:"database"` // "ok" or what is wrong
	NATS       string `json:"nats"`     // "ok" or what is wrong
	// Loop is "ok", or the database error the publish loop keeps failing
	// on with what to do about it; empty before the loop exists.
	Loop string `json:"loop,omitempty"`
	// Paused: publishing is paused by the table's pause switch (publisher
	// pause, or the console); the replica stays ready. PausedBy says who.
	Paused   bool   `json:"paused"`
	PausedBy string `json:"paused_by,omitempty"`
}

func (rd *readiness) check(ctx context.Context) readyReport {
	r := readyReport{Role: roleStarting, Database: "ok", NATS: "ok"}
	if p := rd.poller.Load(); p != nil {
		r.Role, r.Loop = roleStandby, "ok"
		if f := p.Fault(); f != nil {
			r.Loop = f.Error()
		}
		if ps := p.Pause(); ps.Paused {
			r.Paused, r.PausedBy = true, ps.By
		}
		switch st := p.Stats(); {
		case st.Leader && p.Partitioned():
			r.Role, r.Partitions = roleReplica, st.Partitions
		case st.Leader:
			r.Role = roleLeader
		}
	}
	if db := rd.db.Load(); db == nil {
		r.Database = "not connected yet"
	} else if err := rd.pingDB(ctx, db); err != nil {
		r.Database = "unreachable: " + err.Error()
	}
	switch nc := rd.nc.Load(); {
	case nc == nil:
		r.NATS = "not connected yet"
	case nc.IsClosed():
		r.NATS = "connection closed for good"
		if err := nc.LastError(); err != nil {
			r.NATS += ": " + err.Error()
		}
	case nc.Status() != nats.CONNECTED:
		r.NATS = "connection " + nc.Status().String()
	default:
		if err := nc.FlushTimeout(probeTimeout); err != nil {
			r.NATS = "unreachable: " + err.Error()
		}
	}
	r.Ready = r.Database == "ok" && r.NATS == "ok" && (r.Loop == "" || r.Loop == "ok")
	return r
}

// newHTTPHandler routes the publisher's endpoints.
func newHTTPHandler(reg *prometheus.Registry, rd *readiness, log *slog.Logger) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET "+pathMetrics, promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}))
	mux.HandleFunc("GET "+pathHealthz, func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if nc := rd.nc.Load(); nc != nil && nc.IsClosed() {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, "NATS connection closed for good")
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET "+pathReadyz, func(w http.ResponseWriter, req *http.Request) {
		r := rd.check(req.Context())
		w.Header().Set("Content-Type", "application/json")
		if !r.Ready {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		_ = json.NewEncoder(w).Encode(r)
	})
	return mux
}

// checkHTTPAddr reports a --http-addr that is not host:port.
func checkHTTPAddr(addr string) error {
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return usagef("run: --http-addr %q: %v; use host:port, e.g. :9090 or 127.0.0.1:9090", addr, err)
	}
	return nil
}

// serveHTTP listens on addr and serves h until the returned stop function
// is called; stop shuts the server down and waits for it.
func serveHTTP(addr string, h http.Handler, log *slog.Logger) (stop func(), err error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("serve HTTP on --http-addr %s: %w\n"+
			"  choose a free address (e.g. --http-addr :9090), or set it empty to serve no HTTP", addr, err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			log.Error("HTTP server stopped", "err", err)
		}
	}()
	log.Info("serving HTTP", "addr", ln.Addr().String(), "paths", pathMetrics+" "+pathHealthz+" "+pathReadyz)
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		<-done
	}, nil
}
