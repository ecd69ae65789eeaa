package dedup_test

import (
	"context"
	"errors"
	"testing"

	"github.com/jmoiron/sqlx"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/pkg/dedup"
)

// samples gathers c and returns each sample's value by name and labels,
// as "name{label=value,...}"; histograms give their _count.
func samples(t *testing.T, c prometheus.Collector) map[string]float64 {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	require.NoError(t, reg.Register(c))
	families, err := reg.Gather()
	require.NoError(t, err)
	out := map[string]float64{}
	for _, f := range families {
		for _, m := range f.GetMetric() {
			key := f.GetName()
			if h := m.GetHistogram(); h != nil {
				key += "_count"
			}
			key += "{"
			for i, l := range m.GetLabel() {
				if i > 0 {
					key += ","
				}
				key += l.GetName() + "=" + l.GetValue()
			}
			key += "}"
			switch {
			case m.GetCounter() != nil:
				out[key] = m.GetCounter().GetValue()
			case m.GetHistogram() != nil:
				out[key] = float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return out
}

func TestMetricsCountOutcomes(t *testing.T) {
	t.Parallel()
	b := setup(t)
	m := dedup.NewMetrics()
	p, err := dedup.New(b.db.DB, dedup.Config{Metrics: m})
	require.NoError(t, err)
	ctx := context.Background()
	ok := func(ctx context.Context, tx *sqlx.Tx) error { return nil }
	fail := func(ctx context.Context, tx *sqlx.Tx) error { return errors.New("boom") }

	for _, c := range []struct {
		consumer, id string
		fn           func(context.Context, *sqlx.Tx) error
	}{
		{"billing", "e1", ok},
		{"billing", "e1", ok}, // duplicate
		{"billing", "e2", fail},
		{"billing", "e2", ok}, // retried after the error: processed
		{"shipping", "e1", ok},
	} {
		_, _ = p.Process(ctx, c.consumer, c.id, c.fn)
	}
	_, err = p.Process(ctx, "", "e3", ok)
	require.Error(t, err, "an empty consumer is rejected, and not counted")

	require.Equal(t, map[string]float64{
		"outbox_consumer_messages_total{consumer=billing,outcome=processed}":  2,
		"outbox_consumer_messages_total{consumer=billing,outcome=duplicate}":  1,
		"outbox_consumer_messages_total{consumer=billing,outcome=error}":      1,
		"outbox_consumer_messages_total{consumer=shipping,outcome=processed}": 1,
		"outbox_consumer_handler_duration_seconds_count{consumer=billing}":    3,
		"outbox_consumer_handler_duration_seconds_count{consumer=shipping}":   1,
	}, samples(t, m))

	reg := prometheus.NewPedanticRegistry()
	require.NoError(t, reg.Register(m))
	problems, err := testutil.GatherAndLint(reg)
	require.NoError(t, err)
	require.Empty(t, problems, "Prometheus naming conventions")
}
