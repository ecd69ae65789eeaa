package bench

import (
	"fmt"
	"io"
	"strings"
	"time"
)

// progress draws a bar on a terminal, or prints a line at each quarter
// otherwise, for one phase at a time.
type progress struct {
	w       io.Writer
	tty     bool
	name    string
	total   int
	last    int // last quarter printed (plain) or percent drawn (tty)
	started time.Time
}

func (p *progress) start(name string, total int) {
	p.name, p.total, p.last, p.started = name, max(total, 1), -1, time.Now()
	p.set(0)
}

func (p *progress) set(n int) {
	pct := min(100, n*100/p.total)
	if p.tty {
		if pct == p.last {
			return
		}
		p.last = pct
		const width = 30
		fill := pct * width / 100
		fmt.Fprintf(p.w, "\r%-22s [%s%s] %3d%% %d/%d", p.name, strings.Repeat("=", fill), strings.Repeat(" ", width-fill), pct, n, p.total)
		return
	}
	if q := pct / 25; q > p.last {
		p.last = q
		fmt.Fprintf(p.w, "%s: %d/%d (%d%%)\n", p.name, n, p.total, pct)
	}
}

func (p *progress) done() {
	if p.tty {
		fmt.Fprintf(p.w, "\r%-22s done in %s%s\n", p.name, time.Since(p.started).Round(time.Millisecond), strings.Repeat(" ", 40))
	}
}
