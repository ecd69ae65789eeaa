package bench

import (
	"context"
	"database/sql"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/lib/pq"
)

// cost is the CPU a measurement took per event, in microseconds: this
// process (the publisher loop, its NATS client and the bench's own
// polling) and PostgreSQL (the run's backends, from /proc, so only when the
// server runs on this machine). The server's background processes (WAL
// writer, checkpointer) are left out: on a shared server they mostly work
// for other clients.
type cost struct {
	PublisherUS float64 `json:"publisher_cpu_us_per_event"`
	PostgresUS  float64 `json:"postgres_cpu_us_per_event"`
}

// meter is a CPU reading at the start of a measurement.
type meter struct {
	e      *env
	self   int64
	server map[int]int64
}

// startMeter reads the CPU used so far by this process and by PostgreSQL.
func (e *env) startMeter(ctx context.Context) (*meter, error) {
	m := &meter{e: e, self: procTicks(os.Getpid()), server: map[int]int64{}}
	pids, err := e.serverPIDs(ctx)
	if err != nil {
		return nil, err
	}
	for _, pid := range pids {
		m.server[pid] = procTicks(pid)
	}
	return m, nil
}

// stop returns the CPU used since start per event. Backends that started
// meanwhile count from zero; those that ended meanwhile are lost, which
// the pool's idle connections make rare.
func (m *meter) stop(ctx context.Context, events int) cost {
	self := procTicks(os.Getpid()) - m.self
	var server int64
	pids, _ := m.e.serverPIDs(ctx)
	for _, pid := range pids {
		if t := procTicks(pid); t >= 0 {
			server += t - max(m.server[pid], 0)
		}
	}
	per := func(ticks int64) float64 {
		if ticks < 0 || events == 0 {
			return 0
		}
		return float64(ticks) * 1e6 / clockTicks / float64(events)
	}
	return cost{PublisherUS: per(self), PostgresUS: per(server)}
}

// serverPIDs lists the run's backends, by application_name.
func (e *env) serverPIDs(ctx context.Context) ([]int, error) {
	var pids []int
	err := e.db.SelectContext(ctx, &pids, `SELECT pid FROM pg_stat_activity
		WHERE application_name = $1`, e.appName)
	if err != nil {
		return nil, fmt.Errorf("list PostgreSQL processes: %w", err)
	}
	return pids, nil
}

// procTicks returns the user and system CPU of pid in clock ticks, or -1
// when it cannot be read (another machine, another pid namespace, gone).
func procTicks(pid int) int64 {
	t, err := cpuTicks(pid)
	if err != nil {
		return -1
	}
	return t
}

// withParam returns dsn (a URL or key=value pairs) with one more
// connection parameter.
func withParam(dsn, key, value string) string {
	u, err := url.Parse(dsn)
	if err != nil || u.Scheme == "" {
		return strings.TrimSpace(dsn) + " " + key + "=" + pq.QuoteLiteral(value)
	}
	q := u.Query()
	q.Set(key, value)
	u.RawQuery = q.Encode()
	return u.String()
}

// rtProxy forwards connections to PostgreSQL and counts the round trips
// clients make: each Sync (extended protocol) or Query (simple protocol)
// message ends a request the client then waits on.
type rtProxy struct {
	ln     net.Listener
	target string
	n      atomic.Int64
	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  []net.Conn
}

// newRTProxy listens on a loopback port and forwards to target (host:port).
func newRTProxy(target string) (*rtProxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &rtProxy{ln: ln, target: target}
	p.wg.Go(p.accept)
	return p, nil
}

func (p *rtProxy) addr() *net.TCPAddr { return p.ln.Addr().(*net.TCPAddr) }

func (p *rtProxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, c, s)
		p.mu.Unlock()
		p.wg.Go(func() { _, _ = io.Copy(c, s); c.Close() })
		p.wg.Go(func() { _ = p.count(c, s); s.Close() })
	}
}

// count copies the client's messages to the server, counting requests.
func (p *rtProxy) count(c, s net.Conn) error {
	var hdr [5]byte
	// Untyped messages first: an SSL or GSS request (answered with one
	// byte, then another untyped message follows) and the startup.
	for {
		if _, err := io.ReadFull(c, hdr[:4]); err != nil {
			return err
		}
		n := int(binary.BigEndian.Uint32(hdr[:4]))
		body := make([]byte, n-4)
		if _, err := io.ReadFull(c, body); err != nil {
			return err
		}
		if _, err := s.Write(append(hdr[:4:4], body...)); err != nil {
			return err
		}
		if code := binary.BigEndian.Uint32(body[:4]); code != 80877103 && code != 80877104 {
			break
		}
	}
	buf := make([]byte, 64<<10)
	for {
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return err
		}
		if hdr[0] == 'S' || hdr[0] == 'Q' {
			p.n.Add(1)
		}
		if _, err := s.Write(hdr[:]); err != nil {
			return err
		}
		rest := int64(binary.BigEndian.Uint32(hdr[1:])) - 4
		if _, err := io.CopyBuffer(s, io.LimitReader(c, rest), buf); err != nil {
			return err
		}
	}
}

// close stops listening and ends the connections forwarded.
func (p *rtProxy) close() {
	p.ln.Close()
	p.mu.Lock()
	for _, c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

var errNoTarget = errors.New("cannot tell the server's address from the connection string")

// dsnTarget returns the host:port dsn connects to (TCP only).
func dsnTarget(dsn string) (string, error) {
	host, port := "localhost", "5432"
	if u, err := url.Parse(dsn); err == nil && u.Scheme != "" {
		if u.Hostname() != "" {
			host = u.Hostname()
		}
		if u.Port() != "" {
			port = u.Port()
		}
	} else {
		for _, kv := range strings.Fields(dsn) {
			k, v, _ := strings.Cut(kv, "=")
			switch k {
			case "host":
				host = strings.Trim(v, "'")
			case "port":
				port = strings.Trim(v, "'")
			}
		}
	}
	if strings.HasPrefix(host, "/") {
		return "", errNoTarget
	}
	return net.JoinHostPort(host, port), nil
}

// viaProxy returns dsn pointed at the proxy.
func viaProxy(dsn string, a *net.TCPAddr) string {
	if u, err := url.Parse(dsn); err == nil && u.Scheme != "" {
		u.Host = a.String()
		return u.String()
	}
	return strings.TrimSpace(dsn) + fmt.Sprintf(" host=%s port=%d", a.IP, a.Port)
}

// roundTrips drains a backlog of up to 50 batches with the publisher's
// pool connected through a counting proxy, and returns the database round
// trips per batch committed. The lock session and the listener connect
// directly: only the claim loop's pool is counted.
func (e *env) roundTrips(ctx context.Context) (float64, error) {
	target, err := dsnTarget(e.dsn)
	if err != nil {
		return 0, err
	}
	proxy, err := newRTProxy(target)
	if err != nil {
		return 0, err
	}
	defer proxy.close()
	db, err := sql.Open("postgres", viaProxy(e.dsn, proxy.addr()))
	if err != nil {
		return 0, err
	}
	defer db.Close()
	db.SetMaxOpenConns(32)
	db.SetMaxIdleConns(32)
	d, err := e.drainCost(ctx, drainRun{batch: e.cfg.BatchSize, events: min(e.cfg.Events, 50*e.cfg.BatchSize), db: db, rt: proxy})
	if err != nil {
		return 0, err
	}
	if d.batches == 0 {
		return 0, nil
	}
	return float64(d.roundTrips) / float64(d.batches), nil
}
