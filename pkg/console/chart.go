package console

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"html/template"
	"strings"
	"time"
)

// chartBuckets is the chart's minutes: the last hour.
const chartBuckets = 60

// chartTTL is how long a chart is reused: a dozen browsers refreshing the
// overview cost one chart query.
const chartTTL = 10 * time.Second

// chart is the events written and published per minute over the last
// hour, oldest minute first.
type chart struct {
	start              time.Time
	written, published [chartBuckets]int64
}

// chartSum is the chart's totals.
type chartSum struct{ Written, Published, PeakPerMin int64 }

func (c *chart) sum() chartSum {
	var s chartSum
	for i := range chartBuckets {
		s.Written += c.written[i]
		s.Published += c.published[i]
		s.PeakPerMin = max(s.PeakPerMin, c.written[i], c.published[i])
	}
	return s
}

// chart returns the throughput chart, reading it at most every chartTTL.
func (h *Handler) chart(ctx context.Context) (*chart, error) {
	h.chartMu.Lock()
	defer h.chartMu.Unlock()
	if h.chartData != nil && time.Since(h.chartAt) < chartTTL {
		return h.chartData, nil
	}
	c, err := h.readChart(ctx)
	if err != nil {
		return nil, err
	}
	h.chartData, h.chartAt = c, time.Now()
	return c, nil
}

// readChart counts the last hour's events per minute. Neither created_at
// nor published_at is indexed, so it first finds, with a binary search on
// the seq index, the first event created within the hour, and reads only
// the events from there: the cost follows the hour's events, not the
// table's. An event created before the hour and published within it is
// left out of the published line (a backlog drained in the hour shows
// less than it was).
func (h *Handler) readChart(ctx context.Context) (*chart, error) {
	t := h.table.Quoted()
	c := &chart{}
	if err := h.cfg.DB.QueryRowContext(ctx, `SELECT date_trunc('minute', now()) - interval '59 minutes'`).Scan(&c.start); err != nil {
		return nil, fmt.Errorf("read chart: %w", err)
	}
	a, err := h.seqAt(ctx, c.start)
	if err != nil {
		return nil, fmt.Errorf("read chart: %w", err)
	}
	rows, err := h.cfg.DB.QueryContext(ctx, `SELECT floor(extract(epoch FROM created_at - $2) / 60)::int,
			floor(extract(epoch FROM published_at - $2) / 60)::int
		FROM `+t+` WHERE seq >= $1 AND created_at >= $2`, a, c.start)
	if err != nil {
		return nil, fmt.Errorf("read chart: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var w int
		var p sql.NullInt32
		if err := rows.Scan(&w, &p); err != nil {
			return nil, fmt.Errorf("read chart: %w", err)
		}
		if w >= 0 && w < chartBuckets {
			c.written[w]++
		}
		if p.Valid && p.Int32 >= 0 && p.Int32 < chartBuckets {
			c.published[p.Int32]++
		}
	}
	return c, rows.Err()
}

// seqAt returns the lowest seq of an event created at or after at, found
// by a binary search on the seq index (about 20 index probes for a
// million events), or the next seq to be assigned when there is none.
// created_at follows seq closely but not exactly: it is the time the
// writer's transaction began, so an event of a long transaction has an
// earlier created_at than events before it. Callers allow a margin.
func (h *Handler) seqAt(ctx context.Context, at time.Time) (int64, error) {
	t := h.table.Quoted()
	var lo, hi sql.NullInt64
	if err := h.cfg.DB.QueryRowContext(ctx, `SELECT min(seq), max(seq) FROM `+t).Scan(&lo, &hi); err != nil {
		return 0, err
	}
	if !lo.Valid {
		return 1, nil
	}
	a, b := lo.Int64, hi.Int64+1
	for a < b {
		mid := a + (b-a)/2
		var created time.Time
		err := h.cfg.DB.QueryRowContext(ctx, `SELECT created_at FROM `+t+` WHERE seq >= $1 ORDER BY seq LIMIT 1`, mid).Scan(&created)
		switch {
		case errors.Is(err, sql.ErrNoRows):
			b = mid
			continue
		case err != nil:
			return 0, err
		}
		if created.Before(at) {
			a = mid + 1
		} else {
			b = mid
		}
	}
	return a, nil
}

// svg draws the chart: two lines, written and published per minute.
func (c *chart) svg() template.HTML {
	const w, hgt, pad = 600, 140, 24
	peak := max(c.sum().PeakPerMin, 1)
	x := func(i int) float64 { return pad + float64(i)*float64(w-2*pad)/float64(chartBuckets-1) }
	y := func(v int64) float64 { return hgt - pad - float64(v)*float64(hgt-2*pad)/float64(peak) }
	line := func(vs [chartBuckets]int64) string {
		var b strings.Builder
		for i, v := range vs {
			fmt.Fprintf(&b, "%.1f,%.1f ", x(i), y(v))
		}
		return b.String()
	}
	var b strings.Builder
	fmt.Fprintf(&b, `<svg class="chart" viewBox="0 0 %d %d" role="img" aria-label="events written and published per minute, last hour">`, w, hgt)
	fmt.Fprintf(&b, `<line class="axis" x1="%d" y1="%d" x2="%d" y2="%d"/>`, pad, hgt-pad, w-pad, hgt-pad)
	fmt.Fprintf(&b, `<line class="grid" x1="%d" y1="%d" x2="%d" y2="%d"/>`, pad, pad, w-pad, pad)
	fmt.Fprintf(&b, `<text class="label" x="%d" y="%d">%s/min</text>`, pad, pad-6, groupDigits(peak))
	fmt.Fprintf(&b, `<text class="label" x="%d" y="%d">%s</text>`, pad, hgt-6, c.start.UTC().Format("15:04"))
	fmt.Fprintf(&b, `<text class="label end" x="%d" y="%d">now</text>`, w-pad, hgt-6)
	fmt.Fprintf(&b, `<polyline class="written" points="%s"/>`, line(c.written))
	fmt.Fprintf(&b, `<polyline class="published" points="%s"/>`, line(c.published))
	b.WriteString(`</svg>`)
	return template.HTML(b.String()) // numbers and fixed text only
}
