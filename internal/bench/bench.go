// Package bench measures the outbox on the machine it runs on: the
// database's and the broker's ceilings for this workload, how close the
// publisher gets to them draining a backlog, commit-to-consumer latency at
// offered rates, the writer's throughput with and without the NOTIFY
// trigger, and an idle publisher's CPU and memory.
//
// Everything runs on scratch objects made for the run (a PostgreSQL schema
// and a JetStream stream with unique names) and removed afterwards.
package bench

import (
	"cmp"
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgnats/outbox/pkg/outbox"
	"github.com/pgnats/outbox/schema"
)

// Config says what to measure. Zero fields take the defaults in brackets.
type Config struct {
	DatabaseURL string
	NATSURL     string
	// NATSOptions (credentials, TLS) are added to the bench's NATS
	// connection; NATSURLShown is NATSURL as messages show it (without
	// credentials); PublisherEnv is added to the environment of the
	// publisher started for the idle measurement.
	NATSOptions  []nats.Option
	NATSURLShown string
	PublisherEnv []string
	Events       int           // backlog drained [50000]
	Payload      int           // payload bytes [256]
	Entities     int           // entities the backlog spreads over [1000]
	BatchSize    int           // publisher batch size [500]
	Rates        []int         // offered rates for latency, events/s [2000]
	Duration     time.Duration // length of each latency run [20s]
	WriteFor     time.Duration // length of each writer-throughput run [3s]
	Writers      int           // concurrent writer transactions [4]
	IdleFor      time.Duration // idle window for CPU and RSS [10s]
	// SweepRates and SweepBatches, when set, add a sweep: latency at each
	// rate for SweepDuration, and drain throughput at each batch size.
	SweepRates    []int
	SweepBatches  []int
	SweepDuration time.Duration // [5s]
	// Replicas, when set, adds a drain with each of these numbers of
	// publishers run with Partitions partitions [12].
	Replicas   []int
	Partitions int
	// StreamReplicas is the scratch stream's replica count [1]: 3 on a
	// JetStream cluster measures a replicated stream.
	StreamReplicas int
	// Scale, when set, adds a drain of the backlog in a table that already
	// holds each of these numbers of SUCCESS rows.
	Scale []int
	// ScaleCases, when set, adds these scale scenarios (ScaleCaseNames):
	// a READY backlog of ScaleBacklog events [1000000], drained with the
	// rates over its first and last tenth; the backlog past ScaleBlocked
	// blocked entities [10000]; the backlog over ScaleEntities entities
	// [100000]; and the backlog over ScaleRetentionRows old SUCCESS rows
	// [10000000] with and without the retention chore deleting them.
	ScaleCases         []string
	ScaleBacklog       int
	ScaleBlocked       int
	ScaleEntities      int
	ScaleRetentionRows int
	// PublisherBin is the publisher binary whose idle cost is measured.
	// Empty skips that measurement.
	PublisherBin string
	// Progress receives a progress bar (TTY) or lines. Nil: none.
	Progress io.Writer
	TTY      bool
}

func (c Config) withDefaults() Config {
	c.Events = cmp.Or(c.Events, 50000)
	c.Payload = cmp.Or(c.Payload, 256)
	c.Entities = cmp.Or(c.Entities, 1000)
	c.BatchSize = cmp.Or(c.BatchSize, 500)
	if len(c.Rates) == 0 {
		c.Rates = []int{2000}
	}
	c.Duration = cmp.Or(c.Duration, 20*time.Second)
	c.WriteFor = cmp.Or(c.WriteFor, 3*time.Second)
	c.Writers = cmp.Or(c.Writers, 4)
	c.IdleFor = cmp.Or(c.IdleFor, 10*time.Second)
	c.SweepDuration = cmp.Or(c.SweepDuration, 5*time.Second)
	c.Partitions = cmp.Or(c.Partitions, 12)
	c.StreamReplicas = cmp.Or(c.StreamReplicas, 1)
	c = c.scaleDefaults()
	if c.Progress == nil {
		c.Progress = io.Discard
	}
	return c
}

// Latency percentiles in milliseconds.
type Latency struct {
	Rate         int     `json:"rate"`
	EventsPerTx  int     `json:"events_per_tx"`
	AchievedRate float64 `json:"achieved_rate"`
	Samples      int     `json:"samples"`
	P50          float64 `json:"p50"`
	P95          float64 `json:"p95"`
	P99          float64 `json:"p99"`
	Max          float64 `json:"max"`
}

// Result is what Run measured. JSON keys are stable: scripts read them.
type Result struct {
	DBLimit    float64 `json:"db_limit_events_per_sec"`
	NATSLimit  float64 `json:"nats_limit_events_per_sec"`
	Drain      float64 `json:"drain_events_per_sec"`
	DrainRatio float64 `json:"drain_ratio"`
	// The same-run yardsticks (reference.go): the naive serial pipeline
	// over a bare table, and its claim-and-mark alone.
	Reference        float64 `json:"reference_events_per_sec"`
	DrainVsReference float64 `json:"drain_vs_reference"`
	BareDB           float64 `json:"bare_db_events_per_sec"`
	DBLimitVsBare    float64 `json:"db_limit_vs_bare"`
	// CPU per event during the drain and the reference pipeline, and the
	// publisher's database round trips per batch.
	DrainCost          cost               `json:"drain_cost"`
	ReferenceCost      cost               `json:"reference_cost"`
	RoundTripsPerBatch float64            `json:"round_trips_per_batch"`
	Replicas           []ReplicaDrain     `json:"replicas_drain,omitempty"`
	Latency            Latency            `json:"latency_ms"`
	LatencyByRate      map[string]Latency `json:"latency_by_rate,omitempty"`
	Write              struct {
		NotifyOn  float64 `json:"notify_on"`
		NotifyOff float64 `json:"notify_off"`
	} `json:"write_events_per_sec"`
	IdleCPU  *float64 `json:"idle_cpu_percent"`
	RSSMiB   *float64 `json:"rss_mib"`
	Settings struct {
		Events    int `json:"events"`
		Payload   int `json:"payload_bytes"`
		Entities  int `json:"entities"`
		BatchSize int `json:"batch_size"`
	} `json:"settings"`
	Machine Machine      `json:"machine"`
	Sweep   *Sweep       `json:"sweep,omitempty"`
	Scale   []ScalePoint `json:"scale,omitempty"`
	// ScaleCases are the scale scenarios Config.ScaleCases asked for.
	ScaleCases *ScaleCases `json:"scale_cases,omitempty"`
}

// ScalePoint is the drain of the backlog in a table that already held
// SuccessRows published events.
type ScalePoint struct {
	SuccessRows int `json:"success_rows"`
	DrainStat
}

// Sweep is latency across offered rates and drain throughput across batch
// sizes.
type Sweep struct {
	Latency []Latency    `json:"latency"`
	Drain   []DrainPoint `json:"drain"`
}

// DrainPoint is the drain throughput at one batch size.
type DrainPoint struct {
	BatchSize    int     `json:"batch_size"`
	EventsPerSec float64 `json:"events_per_sec"`
}

// ReplicaDrain is the drain throughput of several partitioned publishers.
type ReplicaDrain struct {
	Replicas     int     `json:"replicas"`
	Partitions   int     `json:"partitions"`
	EventsPerSec float64 `json:"events_per_sec"`
}

// Machine describes where the figures were measured.
type Machine struct {
	CPU      string `json:"cpu"`
	Cores    int    `json:"cores"`
	OS       string `json:"os"`
	Go       string `json:"go"`
	Postgres string `json:"postgres"`
	NATS     string `json:"nats"`
	Storage  string `json:"jetstream_storage"`
	Replicas int    `json:"stream_replicas"`
}

// env is one run's scratch schema, stream and connections.
type env struct {
	cfg    Config
	db     *sqlx.DB
	dsn    string
	nc     *nats.Conn
	js     jetstream.JetStream
	stream string
	prefix string
	// appName is the application_name of the run's connections, which
	// tells its backends from other clients' for the CPU measurement.
	appName string
	w       *outbox.Writer
	prog    *progress
}

// Run measures everything Config asks for and cleans up after itself.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	cfg = cfg.withDefaults()
	if err := checkScaleCases(cfg.ScaleCases); err != nil {
		return nil, err
	}
	e, cleanup, err := setup(ctx, cfg)
	if err != nil {
		return nil, err
	}
	defer cleanup()

	res := &Result{LatencyByRate: map[string]Latency{}}
	res.Settings.Events, res.Settings.Payload = cfg.Events, cfg.Payload
	res.Settings.Entities, res.Settings.BatchSize = cfg.Entities, cfg.BatchSize
	res.Machine = e.machine(ctx)

	if res.BareDB, _, err = e.reference(ctx, true); err != nil {
		return nil, fmt.Errorf("bare claim-and-mark: %w", err)
	}
	if res.DBLimit, err = e.drain(ctx, drainRun{batch: cfg.BatchSize, skipPublish: true}); err != nil {
		return nil, fmt.Errorf("database limit: %w", err)
	}
	res.DBLimitVsBare = res.DBLimit / res.BareDB
	if res.NATSLimit, err = e.natsLimit(ctx); err != nil {
		return nil, fmt.Errorf("NATS limit: %w", err)
	}
	if res.Reference, res.ReferenceCost, err = e.reference(ctx, false); err != nil {
		return nil, fmt.Errorf("reference pipeline: %w", err)
	}
	d, err := e.drainCost(ctx, drainRun{batch: cfg.BatchSize})
	if err != nil {
		return nil, fmt.Errorf("drain: %w", err)
	}
	res.Drain, res.DrainCost = d.eventsPerSec, d.cost
	res.DrainRatio = res.Drain / min(res.DBLimit, res.NATSLimit)
	res.DrainVsReference = res.Drain / res.Reference
	if res.RoundTripsPerBatch, err = e.roundTrips(ctx); err != nil {
		return nil, fmt.Errorf("round trips: %w", err)
	}
	for _, n := range cfg.Replicas {
		eps, err := e.drain(ctx, drainRun{batch: cfg.BatchSize, replicas: n, partitions: cfg.Partitions})
		if err != nil {
			return nil, fmt.Errorf("drain with %d replicas: %w", n, err)
		}
		res.Replicas = append(res.Replicas, ReplicaDrain{Replicas: n, Partitions: cfg.Partitions, EventsPerSec: eps})
	}
	for i, rate := range cfg.Rates {
		l, err := e.latency(ctx, rate, cfg.Duration)
		if err != nil {
			return nil, fmt.Errorf("latency at %d/s: %w", rate, err)
		}
		if i == 0 {
			res.Latency = l
		}
		res.LatencyByRate[fmt.Sprint(rate)] = l
	}
	if len(cfg.Rates) == 1 {
		res.LatencyByRate = nil
	}
	if res.Write.NotifyOn, res.Write.NotifyOff, err = e.writeThroughput(ctx); err != nil {
		return nil, fmt.Errorf("writer throughput: %w", err)
	}
	if len(cfg.SweepRates) > 0 || len(cfg.SweepBatches) > 0 {
		res.Sweep = &Sweep{}
		for _, rate := range cfg.SweepRates {
			l, err := e.latency(ctx, rate, cfg.SweepDuration)
			if err != nil {
				return nil, fmt.Errorf("sweep latency at %d/s: %w", rate, err)
			}
			res.Sweep.Latency = append(res.Sweep.Latency, l)
		}
		for _, b := range cfg.SweepBatches {
			eps, err := e.drain(ctx, drainRun{batch: b})
			if err != nil {
				return nil, fmt.Errorf("sweep drain at batch %d: %w", b, err)
			}
			res.Sweep.Drain = append(res.Sweep.Drain, DrainPoint{BatchSize: b, EventsPerSec: eps})
		}
	}
	for _, n := range cfg.Scale {
		d, err := e.drainCost(ctx, drainRun{batch: cfg.BatchSize, success: n, timeClaims: true, settle: true})
		if err != nil {
			return nil, fmt.Errorf("drain over %d SUCCESS rows: %w", n, err)
		}
		res.Scale = append(res.Scale, ScalePoint{SuccessRows: n, DrainStat: statOf(d)})
	}
	if len(cfg.ScaleCases) > 0 {
		if res.ScaleCases, err = e.scaleCases(ctx); err != nil {
			return nil, err
		}
	}
	if cfg.PublisherBin != "" {
		cpu, rss, err := e.idle(ctx)
		if err != nil {
			return nil, fmt.Errorf("idle publisher: %w", err)
		}
		res.IdleCPU, res.RSSMiB = &cpu, &rss
	}
	return res, nil
}

func setup(ctx context.Context, cfg Config) (*env, func(), error) {
	admin, err := sqlx.Open("postgres", cfg.DatabaseURL)
	if err != nil {
		return nil, nil, err
	}
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := admin.PingContext(pctx); err != nil {
		admin.Close()
		return nil, nil, fmt.Errorf("PostgreSQL is unreachable: %w (start it, or set --database-url / DATABASE_URL)", err)
	}
	sfx := suffix()
	schemaName := "bench_" + sfx
	if _, err := admin.ExecContext(ctx, `CREATE SCHEMA `+schemaName); err != nil {
		admin.Close()
		return nil, nil, fmt.Errorf("create scratch schema: %w", err)
	}
	var cleanups []func()
	cleanup := func() {
		for i := len(cleanups) - 1; i >= 0; i-- {
			cleanups[i]()
		}
	}
	cleanups = append(cleanups, func() {
		_, _ = admin.Exec(`DROP SCHEMA ` + schemaName + ` CASCADE`)
		admin.Close()
	})
	fail := func(err error) (*env, func(), error) { cleanup(); return nil, nil, err }

	e := &env{cfg: cfg, appName: "outbox-bench-" + sfx, prefix: "bench" + sfx,
		stream: "BENCH_" + strings.ToUpper(sfx), prog: &progress{w: cfg.Progress, tty: cfg.TTY}}
	e.dsn = withParam(schema.WithSearchPath(cfg.DatabaseURL, schemaName), "application_name", e.appName)
	if e.db, err = sqlx.Open("postgres", e.dsn); err != nil {
		return fail(err)
	}
	e.db.SetMaxOpenConns(32)
	e.db.SetMaxIdleConns(32)
	cleanups = append(cleanups, func() { e.db.Close() })
	if _, err := schema.Migrate(ctx, e.db.DB, schema.Tables{}); err != nil {
		return fail(fmt.Errorf("migrate scratch schema: %w", err))
	}
	if e.w, err = outbox.NewWriter(outbox.Config{}); err != nil {
		return fail(err)
	}
	if e.nc, err = nats.Connect(cfg.NATSURL, append([]nats.Option{nats.ReconnectBufSize(-1)}, cfg.NATSOptions...)...); err != nil {
		return fail(fmt.Errorf("NATS is unreachable at %s: %w (start nats-server -js, or set --nats-url / NATS_URL)", cfg.NATSURLShown, err))
	}
	cleanups = append(cleanups, e.nc.Close)
	if e.js, err = jetstream.New(e.nc); err != nil {
		return fail(err)
	}
	if _, err := e.js.CreateStream(ctx, jetstream.StreamConfig{
		Name: e.stream, Subjects: []string{e.prefix + ".>"}, Storage: jetstream.FileStorage, Duplicates: 2 * time.Minute,
		Replicas: cfg.StreamReplicas,
	}); err != nil {
		return fail(fmt.Errorf("create scratch stream: %w", err))
	}
	cleanups = append(cleanups, func() {
		dctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = e.js.DeleteStream(dctx, e.stream)
	})
	return e, cleanup, nil
}

func (e *env) machine(ctx context.Context) Machine {
	m := Machine{Cores: runtime.NumCPU(), OS: runtime.GOOS + "/" + runtime.GOARCH, Go: runtime.Version(),
		NATS: e.nc.ConnectedServerVersion(), Storage: "file", Replicas: e.cfg.StreamReplicas}
	_ = e.db.GetContext(ctx, &m.Postgres, `SHOW server_version`)
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	return m
}

// reset empties the events table and the stream between measurements.
func (e *env) reset(ctx context.Context) error {
	if _, err := e.db.ExecContext(ctx, `TRUNCATE events`); err != nil {
		return err
	}
	s, err := e.js.Stream(ctx, e.stream)
	if err != nil {
		return err
	}
	return s.Purge(ctx)
}

// prewrite writes n events over entities entities in large transactions,
// through the writer.
func (e *env) prewrite(ctx context.Context, n, entities int, subject string) error {
	payload := makePayload(e.cfg.Payload)
	const chunk = 2000
	e.prog.start("write backlog", n)
	for done := 0; done < n; done += chunk {
		k := min(chunk, n-done)
		evs := make([]outbox.Event, k)
		for i := range evs {
			evs[i] = outbox.Event{EntityType: "bench", EntityID: fmt.Sprint((done + i) % entities),
				Type: "Tick", Subject: subject, Data: payload}
		}
		tx, err := e.db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		if _, err := e.w.Write(ctx, tx, evs...); err != nil {
			tx.Rollback() //nolint:errcheck
			return err
		}
		if err := tx.Commit(); err != nil {
			return err
		}
		e.prog.set(done + k)
	}
	e.prog.done()
	return nil
}

// makePayload returns a JSON string payload of exactly n bytes (n >= 2).
func makePayload(n int) []byte {
	n = max(n, 2)
	b := make([]byte, n)
	b[0], b[n-1] = '"', '"'
	for i := 1; i < n-1; i++ {
		b[i] = 'a' + byte(i%26)
	}
	return b
}

var errTimeout = errors.New("timed out")

// waitFor polls cond until it holds or d passes.
func waitFor(ctx context.Context, d time.Duration, cond func() (bool, error)) error {
	deadline := time.Now().Add(d)
	for {
		ok, err := cond()
		if err != nil || ok {
			return err
		}
		if time.Now().After(deadline) {
			return errTimeout
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// exec runs a statement on the scratch schema.
func (e *env) exec(ctx context.Context, q string) (sql.Result, error) {
	return e.db.ExecContext(ctx, q)
}

// suffix returns a random name suffix for the run's scratch objects.
func suffix() string {
	b := make([]byte, 5)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
