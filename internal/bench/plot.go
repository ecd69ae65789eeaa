package bench

import (
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"io"
	"math"

	"golang.org/x/image/font"
	"golang.org/x/image/font/basicfont"
	"golang.org/x/image/math/fixed"
)

// Plot draws the sweep as a PNG: commit-to-consumer latency percentiles
// against offered rate (left), drain throughput against batch size (right).
// Both x axes are logarithmic; the latency axis is too.
func Plot(w io.Writer, s *Sweep) error {
	if s == nil || len(s.Latency) == 0 || len(s.Drain) == 0 {
		return fmt.Errorf("plot: the sweep has no points")
	}
	img := image.NewRGBA(image.Rect(0, 0, 1200, 520))
	draw.Draw(img, img.Bounds(), image.White, image.Point{}, draw.Src)

	var rates, p50, p95, p99 []float64
	for _, l := range s.Latency {
		rates = append(rates, float64(l.Rate))
		p50, p95, p99 = append(p50, l.P50), append(p95, l.P95), append(p99, l.P99)
	}
	left := panel{img: img, x0: 80, y0: 40, w: 470, h: 400, logY: true,
		title: "commit -> consumer latency (ms) vs offered events/s"}
	left.axes(rates, append(append(append([]float64{}, p50...), p95...), p99...))
	left.line(rates, p50, color.RGBA{0x1f, 0x77, 0xb4, 0xff}, "p50")
	left.line(rates, p95, color.RGBA{0xff, 0x7f, 0x0e, 0xff}, "p95")
	left.line(rates, p99, color.RGBA{0xd6, 0x27, 0x28, 0xff}, "p99")

	var sizes, eps []float64
	for _, d := range s.Drain {
		sizes, eps = append(sizes, float64(d.BatchSize)), append(eps, d.EventsPerSec)
	}
	right := panel{img: img, x0: 680, y0: 40, w: 470, h: 400,
		title: "drain events/s vs batch size"}
	right.axes(sizes, append([]float64{0}, eps...))
	right.line(sizes, eps, color.RGBA{0x2c, 0xa0, 0x2c, 0xff}, "drain")
	return png.Encode(w, img)
}

type panel struct {
	img          *image.RGBA
	x0, y0, w, h int
	logY         bool
	title        string
	xmin, xmax   float64
	ymin, ymax   float64
	legend       int
}

var (
	black = color.RGBA{0, 0, 0, 0xff}
	grey  = color.RGBA{0xdd, 0xdd, 0xdd, 0xff}
)

func (p *panel) axes(xs, ys []float64) {
	p.xmin, p.xmax = minMax(xs)
	p.ymin, p.ymax = minMax(ys)
	if p.logY {
		p.ymin = math.Pow(10, math.Floor(math.Log10(math.Max(p.ymin, 0.1))))
		p.ymax = math.Pow(10, math.Ceil(math.Log10(math.Max(p.ymax, p.ymin*10))))
	} else {
		p.ymin, p.ymax = 0, niceCeil(p.ymax)
	}
	if p.xmin == p.xmax {
		p.xmax = p.xmin * 10
	}
	text(p.img, p.x0, p.y0-15, p.title, black)
	// Frame and grid: decades and their 2 and 5 multiples on a log axis,
	// quarters on a linear one.
	var ticks []float64
	if p.logY {
		for d := p.ymin; d < p.ymax*1.01; d *= 10 {
			for _, m := range []float64{1, 2, 5} {
				if v := d * m; v <= p.ymax*1.01 {
					ticks = append(ticks, v)
				}
			}
		}
	} else {
		for i := 0; i <= 4; i++ {
			ticks = append(ticks, p.ymin+(p.ymax-p.ymin)*float64(i)/4)
		}
	}
	for _, v := range ticks {
		y := p.py(v)
		hline(p.img, p.x0, p.x0+p.w, y, grey)
		text(p.img, p.x0-70, y+4, fmt.Sprintf("%8s", short(v)), black)
	}
	for _, x := range xs {
		px := p.px(x)
		vline(p.img, px, p.y0, p.y0+p.h, grey)
		text(p.img, px-15, p.y0+p.h+18, short(x), black)
	}
	hline(p.img, p.x0, p.x0+p.w, p.y0+p.h, black)
	vline(p.img, p.x0, p.y0, p.y0+p.h, black)
}

func (p *panel) px(x float64) int {
	f := math.Log(x/p.xmin) / math.Log(p.xmax/p.xmin)
	return p.x0 + int(f*float64(p.w))
}

func (p *panel) py(y float64) int {
	var f float64
	if p.logY {
		f = math.Log(math.Max(y, p.ymin)/p.ymin) / math.Log(p.ymax/p.ymin)
	} else {
		f = (y - p.ymin) / (p.ymax - p.ymin)
	}
	return p.y0 + p.h - int(f*float64(p.h))
}

func (p *panel) line(xs, ys []float64, c color.RGBA, label string) {
	for i := range xs {
		x, y := p.px(xs[i]), p.py(ys[i])
		for dx := -3; dx <= 3; dx++ {
			for dy := -3; dy <= 3; dy++ {
				p.img.Set(x+dx, y+dy, c)
			}
		}
		if i > 0 {
			segment(p.img, p.px(xs[i-1]), p.py(ys[i-1]), x, y, c)
		}
	}
	ly := p.y0 + 15 + 16*p.legend
	hline(p.img, p.x0+p.w-90, p.x0+p.w-65, ly-4, c)
	text(p.img, p.x0+p.w-60, ly, label, c)
	p.legend++
}

func minMax(v []float64) (lo, hi float64) {
	lo, hi = math.Inf(1), math.Inf(-1)
	for _, x := range v {
		lo, hi = math.Min(lo, x), math.Max(hi, x)
	}
	return lo, hi
}

func niceCeil(v float64) float64 {
	if v <= 0 {
		return 1
	}
	m := math.Pow(10, math.Floor(math.Log10(v)))
	for _, f := range []float64{1, 2, 2.5, 5, 10} {
		if f*m >= v {
			return f * m
		}
	}
	return 10 * m
}

func short(v float64) string {
	switch {
	case v >= 1000:
		return fmt.Sprintf("%gk", math.Round(v/100)/10)
	case v >= 10:
		return fmt.Sprintf("%.0f", v)
	default:
		return fmt.Sprintf("%.1f", v)
	}
}

func text(img *image.RGBA, x, y int, s string, c color.Color) {
	d := font.Drawer{Dst: img, Src: image.NewUniform(c), Face: basicfont.Face7x13, Dot: fixed.P(x, y)}
	d.DrawString(s)
}

func hline(img *image.RGBA, x0, x1, y int, c color.Color) {
	for x := x0; x <= x1; x++ {
		img.Set(x, y, c)
		img.Set(x, y+1, c)
	}
}

func vline(img *image.RGBA, x, y0, y1 int, c color.Color) {
	for y := y0; y <= y1; y++ {
		img.Set(x, y, c)
	}
}

// segment draws a 2-pixel line from (x0, y0) to (x1, y1).
func segment(img *image.RGBA, x0, y0, x1, y1 int, c color.Color) {
	n := max(abs(x1-x0), abs(y1-y0), 1)
	for i := 0; i <= n; i++ {
		x := x0 + (x1-x0)*i/n
		y := y0 + (y1-y0)*i/n
		img.Set(x, y, c)
		img.Set(x, y+1, c)
		img.Set(x+1, y, c)
	}
}

func abs(v int) int {
	if v < 0 {
		return -v
	}
	return v
}

// PlotScale draws the --scale drains as a PNG: drain throughput (left),
// PostgreSQL's CPU per event (middle) and the claims' latency (right)
// against the rows in the table (the SUCCESS rows plus the backlog of
// backlog events), on a logarithmic x axis.
func PlotScale(w io.Writer, pts []ScalePoint, backlog int) error {
	if len(pts) == 0 {
		return fmt.Errorf("plot: no --scale points")
	}
	img := image.NewRGBA(image.Rect(0, 0, 1500, 520))
	draw.Draw(img, img.Bounds(), image.White, image.Point{}, draw.Src)
	var rows, eps, pg, p50, p99 []float64
	for _, p := range pts {
		rows = append(rows, float64(p.SuccessRows+backlog))
		eps, pg = append(eps, p.EventsPerSec), append(pg, p.Cost.PostgresUS)
		p50, p99 = append(p50, p.Claims.P50), append(p99, p.Claims.P99)
	}
	left := panel{img: img, x0: 80, y0: 40, w: 380, h: 400, title: "drain events/s vs rows in the table"}
	left.axes(rows, append([]float64{0}, eps...))
	left.line(rows, eps, color.RGBA{0x2c, 0xa0, 0x2c, 0xff}, "drain")
	mid := panel{img: img, x0: 580, y0: 40, w: 380, h: 400, title: "PostgreSQL CPU us/event vs rows"}
	mid.axes(rows, append([]float64{0}, pg...))
	mid.line(rows, pg, color.RGBA{0xd6, 0x27, 0x28, 0xff}, "postgres")
	right := panel{img: img, x0: 1080, y0: 40, w: 380, h: 400, logY: true, title: "claim latency (ms) vs rows"}
	right.axes(rows, append(append([]float64{}, p50...), p99...))
	right.line(rows, p50, color.RGBA{0x1f, 0x77, 0xb4, 0xff}, "p50")
	right.line(rows, p99, color.RGBA{0xd6, 0x27, 0x28, 0xff}, "p99")
	return png.Encode(w, img)
}
