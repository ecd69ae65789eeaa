package dedup

import (
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics counts what Process does, per consumer, as Prometheus
// collectors:
//
//	outbox_consumer_messages_total{consumer, outcome}
//	    outcome "processed" (handler ran, committed), "duplicate" (skipped)
//	    or "error" (handler failed or panicked, or the database failed;
//	    rolled back)
//	outbox_consumer_handler_duration_seconds{consumer}
//	    time of a Process call that was not a duplicate: the dedup insert,
//	    the handler and the commit (or the rollback)
//
// Metrics is a prometheus.Collector: register it once (for example
// prometheus.MustRegister(m)) and pass it as Config.Metrics to any number
// of Processors. It is safe for concurrent use.
type Metrics struct {
	messages *prometheus.CounterVec
	duration *prometheus.HistogramVec
}

// NewMetrics returns unregistered consumer metrics.
func NewMetrics() *Metrics {
	return &Metrics{
		messages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "outbox_consumer_messages_total",
			Help: "Messages handed to dedup.Process, by consumer and outcome: processed, duplicate (skipped) or error.",
		}, []string{"consumer", "outcome"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "outbox_consumer_handler_duration_seconds",
			Help:    "Time of a dedup.Process call that was not a duplicate: the dedup insert, the handler and the commit or rollback.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16), // 0.5ms to 16s
		}, []string{"consumer"}),
	}
}

// Describe implements prometheus.Collector.
func (m *Metrics) Describe(ch chan<- *prometheus.Desc) {
	m.messages.Describe(ch)
	m.duration.Describe(ch)
}

// Collect implements prometheus.Collector.
func (m *Metrics) Collect(ch chan<- prometheus.Metric) {
	m.messages.Collect(ch)
	m.duration.Collect(ch)
}

// observe records one Process call; a nil *Metrics records nothing, and
// neither does a call rejected for an empty key or a nil function.
func (m *Metrics) observe(consumer string, res Result, err error, start time.Time) {
	if m == nil || errors.As(err, new(*KeyError)) || errors.Is(err, ErrNilHandler) {
		return
	}
	outcome := "error"
	switch {
	case err != nil:
	case res == Duplicate:
		m.messages.WithLabelValues(consumer, "duplicate").Inc()
		return
	default:
		outcome = "processed"
	}
	m.messages.WithLabelValues(consumer, outcome).Inc()
	m.duration.WithLabelValues(consumer).Observe(time.Since(start).Seconds())
}
