package main

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/robfig/cron/v3"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/internal/redact"
)

type runOptions struct {
	common
	nats            natsOptions
	batchSize       int
	batchBytes      int
	pollInterval    time.Duration
	noListen        bool
	ackTimeout      time.Duration
	maxAttempts     int
	retryBase       time.Duration
	retryMax        time.Duration
	backoffMax      time.Duration
	leaderTimeout   time.Duration
	partitions      int
	replicaID       string
	createStream    string
	streamSubjects  string
	duplicateWindow time.Duration
	streamStorage   string
	backlogEvery    string
	retentionEvery  string
	retention       time.Duration
	processed       processedRetention
	httpAddr        string
	metricsEvery    string
	console         consoleOptions
}

// maxTimeoutFlag bounds --ack-timeout and --leader-timeout, from which the
// publisher derives PostgreSQL timeouts.
const maxTimeoutFlag = 24 * time.Hour

func runPublisher(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var o runOptions
	c := newCommand("run", "", `
Publish READY events to NATS JetStream, oldest first, and mark them SUCCESS
once JetStream has acknowledged them. Wakes on NOTIFY from the insert
trigger, or every --poll-interval. One publisher per table is active; others
started against the same table wait as standbys and take over within
seconds when it dies. SIGTERM or SIGINT: stop claiming, finish the batch in
flight, exit 0.

With --partitions P, every publisher started with the same P is active:
entities hash into P partitions, each publisher leases an even share and
publishes only those, and the shares move within seconds when publishers
join or leave. An entity's events still go out in order.`)
	o.common.register(c)
	o.nats.register(c, "NATS server URL(s), comma-separated")
	c.Int(&o.batchSize, "batch-size", 500, "most events claimed and published at once")
	c.Bytes(&o.batchBytes, "batch-bytes", poller.DefaultBatchBytes, "largest total `size` of the events (payloads and headers) claimed at once: bytes, or a number with KiB, MiB or GiB; a larger event is claimed alone, and two batches may be in memory")
	c.Duration(&o.pollInterval, "poll-interval", time.Second, "fallback poll when no NOTIFY arrives")
	c.Bool(&o.noListen, "no-listen", false, "poll only; do not LISTEN for the insert trigger's NOTIFY")
	c.Duration(&o.ackTimeout, "ack-timeout", 5*time.Second, "how long a batch waits for JetStream's acks before backing off")
	c.Int(&o.maxAttempts, "max-attempts", 10, "refusals of one event before it is FAILED")
	c.Duration(&o.retryBase, "retry-base", time.Second, "first delay before a refused event is retried (doubles each attempt)")
	c.Duration(&o.retryMax, "retry-max", 5*time.Minute, "longest delay before a refused event is retried")
	c.Duration(&o.backoffMax, "backoff-max", 30*time.Second, "longest pause while the database or broker is unreachable")
	c.Duration(&o.leaderTimeout, "leader-timeout", 5*time.Second, "how soon a hung leader loses its lock to a standby (with --partitions: how long a lease lasts without a heartbeat)")
	c.Int(&o.partitions, "partitions", 0, fmt.Sprintf("run as one of several active publishers sharing P partitions of the entities, 1 to %d; every publisher of the table needs the same P (0: a single leader, the others stand by)", poller.MaxPartitions))
	c.String(&o.replicaID, "replica-id", "", "with --partitions: this publisher's name in the lease table, unique per process (default: host-pid-random)")
	c.String(&o.createStream, "create-stream", "", "create or update this JetStream stream at start (for development)")
	c.String(&o.streamSubjects, "stream-subjects", ">", "with --create-stream: comma-separated subjects the stream stores")
	c.Duration(&o.duplicateWindow, "duplicate-window", 2*time.Minute, "with --create-stream: the stream's duplicate window")
	c.String(&o.streamStorage, "stream-storage", "file", "with --create-stream: file or memory")
	c.String(&o.backlogEvery, "backlog-schedule", "@every 1m", "cron schedule of the backlog log line (empty: off)")
	c.String(&o.retentionEvery, "retention-schedule", "@every 10m", "cron schedule of the retention deletes, when --retention or --processed-retention is set")
	c.Duration(&o.retention, "retention", 0, "delete SUCCESS events published longer ago than this (0: keep them; the table is also the entities' history)")
	o.processed.register(c)
	c.String(&o.httpAddr, "http-addr", "", "serve /metrics, /healthz and /readyz on this host:port, e.g. :9090 (empty: no HTTP)")
	c.String(&o.metricsEvery, "metrics-schedule", "@every 15s", "with --http-addr: cron schedule of the backlog gauges' refresh query")
	o.console.register(c)
	if err := c.parse(args, stdout); err != nil {
		return err
	}
	log, err := o.logger(stderr)
	if err != nil {
		return err
	}
	if o.batchSize < 1 || o.maxAttempts < 1 {
		return usagef("run: --batch-size and --max-attempts must be at least 1")
	}
	if err := o.nats.check("run"); err != nil {
		return err
	}
	for name, d := range map[string]time.Duration{"poll-interval": o.pollInterval, "ack-timeout": o.ackTimeout,
		"retry-base": o.retryBase, "retry-max": o.retryMax, "backoff-max": o.backoffMax, "leader-timeout": o.leaderTimeout} {
		if d <= 0 {
			return usagef("run: --%s must be positive, got %s", name, d)
		}
	}
	// PostgreSQL takes timeouts of at most 2^31-1 ms (24.8 days). The lock
	// session waits up to 2 × (2 × --ack-timeout + 5s) and idles out after
	// --leader-timeout: past the limit every election failed, for ever,
	// with the process up.
	for name, d := range map[string]time.Duration{"ack-timeout": o.ackTimeout, "leader-timeout": o.leaderTimeout} {
		if d > maxTimeoutFlag {
			return usagef("run: --%s must be at most %s, got %s", name, maxTimeoutFlag, d)
		}
	}
	if o.retention < 0 {
		return usagef("run: --retention must not be negative")
	}
	if o.partitions < 0 || o.partitions > poller.MaxPartitions {
		return usagef("run: --partitions must be between 0 and %d, got %d", poller.MaxPartitions, o.partitions)
	}
	if o.replicaID != "" && o.partitions == 0 {
		return usagef("run: --replica-id needs --partitions")
	}
	if err := o.processed.validate(); err != nil {
		return err
	}
	if o.streamStorage != "file" && o.streamStorage != "memory" {
		return usagef("run: --stream-storage %q: use file or memory", o.streamStorage)
	}
	for name, spec := range map[string]string{"backlog-schedule": o.backlogEvery,
		"retention-schedule": o.retentionEvery, "metrics-schedule": o.metricsEvery} {
		if err := checkSchedule(name, spec); err != nil {
			return err
		}
	}
	if o.httpAddr != "" {
		if err := checkHTTPAddr(o.httpAddr); err != nil {
			return err
		}
	}
	if err := o.console.check(o.httpAddr); err != nil {
		return err
	}

	log.Info("publisher starting", "table", o.table, "database", redact.DSN(o.databaseURL), "nats", redact.NATS(o.nats.url),
		"batch_size", o.batchSize, "batch_bytes", o.batchBytes, "listen", !o.noListen, "poll_interval", o.pollInterval)
	metrics := poller.NewMetrics()
	var ready readiness
	cons := &consoleServer{o: o.console, log: log}
	if o.httpAddr != "" {
		// Up before the database, so /healthz answers while waiting for it.
		h := newHTTPHandler(newRegistry(metrics), &ready, log)
		if o.console.enabled {
			mux := http.NewServeMux()
			mux.Handle("/", h)
			mux.Handle(pathConsole, cons)
			h = mux
			log.Info("serving the web console", "path", pathConsole, "actions", o.console.actions,
				"basic_auth", o.console.user != "", "bearer_token", o.console.token != "", "insecure", o.console.insecure)
		}
		stopHTTP, err := serveHTTP(o.httpAddr, h, log)
		if err != nil {
			return err
		}
		defer stopHTTP()
	}
	db, err := waitForDB(ctx, o.databaseURL, o.backoffMax, log)
	if err != nil || db == nil {
		return err // nil when stopped while waiting
	}
	defer db.Close()
	if err := checkSession(ctx, db, o.databaseURL); err != nil {
		return err
	}
	ready.db.Store(db)
	if o.console.enabled {
		err := cons.start(db, o.table, o.processed.table, func() jetstream.JetStream {
			nc := ready.nc.Load()
			if nc == nil || nc.IsClosed() {
				return nil
			}
			js, err := jetstream.New(nc)
			if err != nil {
				return nil
			}
			return js
		})
		if err != nil {
			return err
		}
	}
	nc, err := connectNATS(o.nats, true, log, metrics.NATSReconnects.Inc)
	if err != nil {
		return err
	}
	ready.nc.Store(nc)
	defer func() { ready.nc.Load().Close() }() // the last connection runPoller made

	cfg := poller.Config{
		DB: db, DSN: o.databaseURL, NATS: nc, Table: o.table, BatchSize: o.batchSize, BatchBytes: o.batchBytes,
		PollInterval: o.pollInterval, NoListen: o.noListen, AckTimeout: o.ackTimeout,
		MaxAttempts: o.maxAttempts, RetryBase: o.retryBase, RetryMax: o.retryMax,
		BackoffMax: o.backoffMax, LeaderTimeout: o.leaderTimeout, Partitions: o.partitions,
		ReplicaID: o.replicaID, Logger: log, Metrics: metrics, MaxControlLine: o.nats.maxControlLine,
	}
	p, err := poller.New(cfg)
	if err != nil {
		return usageError{err}
	}
	ready.poller.Store(p)
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	if o.createStream != "" {
		if err := createStream(ctx, js, o, log); err != nil {
			return err
		}
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	var created []string
	if o.createStream != "" {
		created = append(created, o.createStream)
	}
	if err := poller.CheckStreams(cctx, db, js, o.table, cfg.RetryHorizon(), log, created...); err != nil {
		log.Warn("could not check streams at start", "err", err)
	}
	cancel()
	if err := o.processed.check(ctx, db, js, o.table, log); err != nil {
		return err
	}
	hk := poller.Housekeeping{DB: db, Table: o.table, Logger: log, BacklogSchedule: o.backlogEvery}
	if o.retention > 0 {
		hk.RetentionSchedule, hk.Retention = o.retentionEvery, o.retention
	}
	if o.processed.retention > 0 {
		hk.RetentionSchedule = o.retentionEvery
		hk.ProcessedRetention, hk.ProcessedTable = o.processed.retention, o.processed.table
	}
	if o.httpAddr != "" {
		hk.MetricsSchedule, hk.Metrics = o.metricsEvery, metrics
	}
	stopHK, err := poller.StartHousekeeping(ctx, hk)
	if err != nil {
		return usageError{err}
	}
	defer stopHK()
	err = runPoller(ctx, p, cfg, &ready, log, func() (*nats.Conn, error) {
		return connectNATS(o.nats, true, log, metrics.NATSReconnects.Inc)
	})
	if errors.Is(err, poller.ErrReplicaIDInUse) {
		return fmt.Errorf("%w; give every process its own --replica-id, or stop the other one", err)
	}
	return err
}

// runPoller runs p until ctx ends. When p's NATS connection is closed for
// good (nats.go never reconnects a connection the server closed, for a
// protocol error for instance), it connects again with connect and runs a
// new Poller of cfg on the new connection, which ready then shows. The
// reconnections back off from 250ms up to cfg.BackoffMax while connections
// keep closing within a minute.
func runPoller(ctx context.Context, p *poller.Poller, cfg poller.Config, ready *readiness, log *slog.Logger,
	connect func() (*nats.Conn, error)) error {
	wait := time.Duration(0)
	for {
		started := time.Now()
		err := p.Run(ctx)
		if !errors.Is(err, poller.ErrNATSClosed) || ctx.Err() != nil {
			return err
		}
		if time.Since(started) > time.Minute {
			wait = 0
		}
		log.Error("NATS connection closed for good; connecting again", "err", err, "in", wait)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
		wait = min(max(2*wait, 250*time.Millisecond), cmp.Or(cfg.BackoffMax, 30*time.Second))
		nc, cerr := connect()
		if cerr != nil {
			return fmt.Errorf("connect to NATS again after %w: %w", err, cerr)
		}
		ready.nc.Store(nc)
		cfg.NATS = nc
		if p, err = poller.New(cfg); err != nil {
			nc.Close()
			return err
		}
		ready.poller.Store(p)
	}
}

// checkSchedule reports a cron schedule flag that robfig/cron cannot
// parse; an empty one turns its chore off.
func checkSchedule(flag, spec string) error {
	if spec == "" {
		return nil
	}
	if _, err := cron.ParseStandard(spec); err != nil {
		return usagef("run: --%s %q: %v; use a cron expression (\"*/5 * * * *\") or \"@every 30s\", or empty to turn it off", flag, spec, err)
	}
	return nil
}

// waitForDB connects to PostgreSQL, retrying with back-off while it is
// unreachable: a publisher started before its database waits for it. It
// returns nil, nil when ctx ends first.
func waitForDB(ctx context.Context, dsn string, maxWait time.Duration, log *slog.Logger) (*sql.DB, error) {
	if err := checkDSN(dsn); err != nil {
		return nil, err
	}
	db, err := sql.Open("postgres", dsn)
	if err != nil {
		return nil, usagef("--database-url %s: %v", redact.DSN(dsn), err)
	}
	db.SetMaxIdleConns(4) // the loop's three (poller.Config.DB), and one for /readyz and metrics
	wait := 250 * time.Millisecond
	for {
		err := pingDB(ctx, db, dsn)
		if err == nil {
			return db, nil
		}
		log.Error("database unreachable; retrying", "err", err, "retry_in", wait)
		select {
		case <-ctx.Done():
			db.Close()
			return nil, nil
		case <-time.After(wait):
		}
		wait = min(2*wait, maxWait)
	}
}

// checkSession refuses a database URL whose connections do not keep their
// session (poller.CheckSession): a pooler in transaction or statement
// mode, which would silently break leadership and wake-ups. That is a
// usage error; a statement that fails otherwise is an error.
func checkSession(ctx context.Context, db *sql.DB, dsn string) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	err := poller.CheckSession(ctx, db)
	if errors.Is(err, poller.ErrNoSession) {
		return usagef("run: --database-url %s: %v\n"+
			"  the publisher holds advisory locks for its leadership and LISTENs for wake-ups, which need a session of its own:\n"+
			"  point --database-url (or DATABASE_URL) at PostgreSQL directly, or at a pooler in session mode (PgBouncer: pool_mode = session);\n"+
			"  the services writing events may keep using transaction pooling", redact.DSN(dsn), err)
	}
	if err != nil {
		return fmt.Errorf("run: --database-url %s: %w\n"+
			"  if this is a pooler in statement mode, point the publisher at PostgreSQL directly or at a pooler in session mode", redact.DSN(dsn), err)
	}
	return nil
}

func createStream(ctx context.Context, js jetstream.JetStream, o runOptions, log *slog.Logger) error {
	storage := jetstream.FileStorage
	if o.streamStorage == "memory" {
		storage = jetstream.MemoryStorage
	}
	var subjects []string
	for _, s := range strings.Split(o.streamSubjects, ",") {
		if s = strings.TrimSpace(s); s != "" {
			subjects = append(subjects, s)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	s, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name: o.createStream, Subjects: subjects, Storage: storage, Duplicates: o.duplicateWindow,
	})
	if err != nil {
		return fmt.Errorf("create stream %q for %v: %w\n"+
			"  check --create-stream and --stream-subjects (dot-separated tokens; * and > as wildcards, not overlapping another stream's), "+
			"and that the server runs JetStream (nats-server -js)", o.createStream, subjects, err)
	}
	log.Info("stream ready", "stream", s.CachedInfo().Config.Name, "subjects", subjects, "duplicate_window", o.duplicateWindow)
	return nil
}
