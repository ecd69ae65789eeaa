package poller

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Outcomes of an event the loop finished with, the values of the outcome
// label of Metrics.Events.
const (
	OutcomeSuccess = "success" // acked by JetStream and marked SUCCESS
	OutcomeRetried = "retried" // refused; attempts+1, tried again later
	OutcomeFailed  = "failed"  // refused and moved to FAILED
)

// Metrics are the publisher's Prometheus collectors. Build them with
// NewMetrics, register them (Metrics is a prometheus.Collector) and pass
// them as Config.Metrics and Housekeeping.Metrics. The loop updates the
// counters and histograms as it works; the backlog gauges, which need a
// query, are refreshed on Housekeeping.MetricsSchedule. Every method is
// safe on a nil *Metrics, which records nothing.
type Metrics struct {
	// Events counts events the loop finished with, by outcome
	// (OutcomeSuccess, OutcomeRetried, OutcomeFailed).
	Events *prometheus.CounterVec
	// PublishLatency is the time from sending an event to JetStream until
	// its PubAck arrived.
	PublishLatency prometheus.Histogram
	// BatchDuration is the time of one non-empty batch, from the start of
	// its claim to the commit of its mark.
	BatchDuration prometheus.Histogram
	// BatchSize is the number of events claimed by each non-empty batch.
	BatchSize prometheus.Histogram
	// Backoffs counts the times the loop paused because the database or
	// the broker was unreachable or too slow.
	Backoffs prometheus.Counter
	// OrderViolations counts events JetStream stored after an earlier event
	// of their entity that this publisher sent ahead of them was refused,
	// failed or not acknowledged in time: the earlier one, sent again,
	// arrives after. Any increase means an entity's order is broken (or,
	// for a lost ack, may be); see docs/ARCHITECTURE.md "Ordering,
	// precisely".
	OrderViolations prometheus.Counter
	// Leader is 1 while this process holds the leader lock (shared, with
	// partitions), else 0.
	Leader prometheus.Gauge
	// Paused is 1 while the table's pause switch is on (as this process
	// last read it, while it publishes or stands by), else 0.
	Paused prometheus.Gauge
	// PartitionsHeld is the number of partitions this process publishes
	// (0 without partitions).
	PartitionsHeld prometheus.Gauge
	// PartitionsConfigured is this process's partition count (Config.
	// Partitions; 0 for a single leader), set by New: alerts compare it
	// with the sum of PartitionsHeld.
	PartitionsConfigured prometheus.Gauge
	// NATSReconnects counts reconnections of the publisher's NATS
	// connection (incremented by whoever owns the connection).
	NATSReconnects prometheus.Counter
	// DatabaseReconnects counts re-established LISTEN connections to
	// PostgreSQL after they were lost.
	DatabaseReconnects prometheus.Counter

	// ReadyEvents is the READY backlog, due or waiting for a retry.
	ReadyEvents prometheus.Gauge
	// RetryingEvents are the READY events waiting for a retry after a
	// refusal (attempts > 0).
	RetryingEvents prometheus.Gauge
	// OldestReadyAge is the age of the oldest READY event in seconds, 0
	// when there is none.
	OldestReadyAge prometheus.Gauge
	// FailedEvents is the number of FAILED events.
	FailedEvents prometheus.Gauge
	// BlockedEntities is the number of entities whose later events wait
	// behind a FAILED event or one waiting for a retry not yet due.
	BlockedEntities prometheus.Gauge
	// BacklogRefreshed is the Unix time of the last successful refresh of
	// the gauges above.
	BacklogRefreshed prometheus.Gauge
}

// NewMetrics returns the publisher's collectors, unregistered.
func NewMetrics() *Metrics {
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: help})
	}
	gauge := func(name, help string) prometheus.Gauge {
		return prometheus.NewGauge(prometheus.GaugeOpts{Name: name, Help: help})
	}
	m := &Metrics{
		Events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "outbox_events_published_total",
			Help: "Events the publisher finished with, by outcome: success (acked and marked SUCCESS), retried (refused, tried again later), failed (refused, moved to FAILED).",
		}, []string{"outcome"}),
		PublishLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "outbox_publish_latency_seconds",
			Help:    "Time from sending an event to JetStream until its PubAck arrived.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16), // 0.5ms to 16s
		}),
		BatchDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "outbox_batch_duration_seconds",
			Help:    "Time of one non-empty batch, from the start of its claim to the commit of its mark.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 16), // 1ms to 32s
		}),
		BatchSize: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "outbox_batch_size_events",
			Help:    "Events claimed by each non-empty batch.",
			Buckets: []float64{1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000},
		}),
		Backoffs: counter("outbox_publish_backoffs_total",
			"Times the publish loop paused because the database or the broker was unreachable or too slow."),
		OrderViolations: counter("outbox_order_violations_total",
			"Events stored by JetStream after an earlier event of their entity, sent ahead of them, was refused, failed or not acknowledged in time: the entity's order is broken (or, for a lost ack, may be)."),
		Leader: gauge("outbox_leader",
			"1 while this publisher holds the leader lock of its table (shared, with --partitions) and publishes, 0 while it stands by."),
		Paused: gauge("outbox_paused",
			"1 while publishing is paused by the table's pause switch ('publisher pause' or the console), 0 otherwise."),
		PartitionsHeld: gauge("outbox_partitions_held",
			"Partitions this publisher leases and publishes; 0 without --partitions."),
		PartitionsConfigured: gauge("outbox_partitions_configured",
			"This publisher's --partitions value; 0 for a single leader. With partitions, sum(outbox_partitions_held) should equal it."),
		NATSReconnects: counter("outbox_nats_reconnects_total",
			"Reconnections of the publisher's NATS connection."),
		DatabaseReconnects: counter("outbox_database_reconnects_total",
			"Re-established LISTEN connections to PostgreSQL after one was lost."),
		ReadyEvents: gauge("outbox_ready_events",
			"READY events: the backlog, due or waiting for a retry."),
		RetryingEvents: gauge("outbox_retrying_events",
			"READY events waiting for a retry after a refusal."),
		OldestReadyAge: gauge("outbox_oldest_ready_age_seconds",
			"Age of the oldest READY event (database time), 0 when there is none."),
		FailedEvents: gauge("outbox_failed_events",
			"FAILED events, waiting for an operator (publisher requeue)."),
		BlockedEntities: gauge("outbox_blocked_entities",
			"Entities whose later events wait behind a FAILED event or one waiting for a retry not yet due."),
		BacklogRefreshed: gauge("outbox_backlog_refresh_timestamp_seconds",
			"Unix time of the last successful refresh of the backlog gauges."),
	}
	for _, o := range []string{OutcomeSuccess, OutcomeRetried, OutcomeFailed} {
		m.Events.WithLabelValues(o) // export zeros, so rate() works from the start
	}
	return m
}

func (m *Metrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.Events, m.PublishLatency, m.BatchDuration, m.BatchSize, m.Backoffs, m.OrderViolations,
		m.Leader, m.Paused, m.PartitionsHeld, m.PartitionsConfigured, m.NATSReconnects, m.DatabaseReconnects, m.ReadyEvents, m.RetryingEvents,
		m.OldestReadyAge, m.FailedEvents, m.BlockedEntities, m.BacklogRefreshed}
}

// Describe implements prometheus.Collector.
func (m *Metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, c := range m.collectors() {
		c.Describe(ch)
	}
}

// Collect implements prometheus.Collector.
func (m *Metrics) Collect(ch chan<- prometheus.Metric) {
	for _, c := range m.collectors() {
		c.Collect(ch)
	}
}

// The loop's hooks; each is a no-op on a nil *Metrics.

func (m *Metrics) outcome(o string) {
	if m != nil {
		m.Events.WithLabelValues(o).Inc()
	}
}

func (m *Metrics) acked(sent time.Time) {
	if m != nil {
		m.PublishLatency.Observe(time.Since(sent).Seconds())
	}
}

func (m *Metrics) batch(claimed, acked int, d time.Duration) {
	if m != nil {
		m.BatchDuration.Observe(d.Seconds())
		m.BatchSize.Observe(float64(claimed))
		m.Events.WithLabelValues(OutcomeSuccess).Add(float64(acked))
	}
}

func (m *Metrics) backoff() {
	if m != nil {
		m.Backoffs.Inc()
	}
}

func (m *Metrics) orderViolation() {
	if m != nil {
		m.OrderViolations.Inc()
	}
}

func (m *Metrics) partitionsHeld(n int) {
	if m != nil {
		m.PartitionsHeld.Set(float64(n))
	}
}

func (m *Metrics) leading(on bool) {
	switch {
	case m == nil:
	case on:
		m.Leader.Set(1)
	default:
		m.Leader.Set(0)
	}
}

func (m *Metrics) dbReconnect() {
	if m != nil {
		m.DatabaseReconnects.Inc()
	}
}

// backlog is the part of Status cheap enough to read often: every count
// uses the table's partial indexes or scans only the READY backlog.
type backlog struct {
	Ready           int
	Retrying        int
	OldestReadyAge  time.Duration // 0 when nothing is READY
	Failed          int
	BlockedEntities int
}

// readBacklog reads the backlog of the events table whose quoted name is
// table.
func readBacklog(ctx context.Context, db *sql.DB, table string) (backlog, error) {
	var (
		b   backlog
		age sql.NullFloat64
	)
	err := db.QueryRowContext(ctx, `SELECT
			(SELECT count(*) FROM `+table+` WHERE event_status = 'READY'),
			(SELECT count(*) FROM `+table+` WHERE event_status = 'READY' AND attempts > 0),
			(SELECT extract(epoch FROM now() - min(created_at)) FROM `+table+` WHERE event_status = 'READY'),
			(SELECT count(*) FROM `+table+` WHERE event_status = 'FAILED'),
			(SELECT count(*) FROM (SELECT DISTINCT entity_type, entity_id FROM `+table+` e
				WHERE `+blocksSQL("e")+`) b)`).
		Scan(&b.Ready, &b.Retrying, &age, &b.Failed, &b.BlockedEntities)
	if err != nil {
		return backlog{}, fmt.Errorf("read backlog: %w", err)
	}
	if age.Valid {
		b.OldestReadyAge = time.Duration(age.Float64 * float64(time.Second))
	}
	return b, nil
}

// setBacklog sets the backlog gauges.
func (m *Metrics) setBacklog(b backlog) {
	if m == nil {
		return
	}
	m.ReadyEvents.Set(float64(b.Ready))
	m.RetryingEvents.Set(float64(b.Retrying))
	m.OldestReadyAge.Set(b.OldestReadyAge.Seconds())
	m.FailedEvents.Set(float64(b.Failed))
	m.BlockedEntities.Set(float64(b.BlockedEntities))
	m.BacklogRefreshed.SetToCurrentTime()
}

func (m *Metrics) paused(on bool) {
	switch {
	case m == nil:
	case on:
		m.Paused.Set(1)
	default:
		m.Paused.Set(0)
	}
}
