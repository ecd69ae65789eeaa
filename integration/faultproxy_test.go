//go:build faults

package integration

import (
	"net"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

// faultProxy is a TCP proxy the test controls. While black-holed it stops
// forwarding in both directions but keeps every connection open, as a
// network that silently drops packets would: writers fill the kernel
// buffers and then block, readers see nothing. Healing it lets the held
// bytes through, as TCP retransmission would.
type faultProxy struct {
	ln     net.Listener
	target string

	mu    sync.Mutex
	holed bool
	heal  chan struct{} // closed when the black hole ends
	conns []net.Conn
}

// newFaultProxy listens on a free local port and forwards to target until
// the test ends. An empty target refuses connections (closes them at once)
// until setTarget names one.
func newFaultProxy(t *testing.T, target string) *faultProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &faultProxy{ln: ln, target: target, heal: make(chan struct{})}
	close(p.heal)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

// addr is the proxy's host:port.
func (p *faultProxy) addr() string { return p.ln.Addr().String() }

// setTarget sets where new connections are forwarded.
func (p *faultProxy) setTarget(target string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.target = target
}

// sever closes every connection open through the proxy, dropping what a
// black hole holds: both ends see the connection reset, as peers of a
// host that died do. New connections are forwarded as before.
func (p *faultProxy) sever() {
	p.mu.Lock()
	conns := p.conns
	p.conns = nil
	p.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
}

// blackhole stops forwarding.
func (p *faultProxy) blackhole() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.holed {
		p.holed = true
		p.heal = make(chan struct{})
	}
}

// restore forwards again.
func (p *faultProxy) restore() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.holed {
		p.holed = false
		close(p.heal)
	}
}

// gate blocks while the proxy is black-holed.
func (p *faultProxy) gate() {
	p.mu.Lock()
	heal := p.heal
	p.mu.Unlock()
	<-heal
}

func (p *faultProxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		target := p.target
		p.mu.Unlock()
		if target == "" {
			c.Close()
			continue
		}
		up, err := net.Dial("tcp", target)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, c, up)
		p.mu.Unlock()
		go p.pipe(up, c)
		go p.pipe(c, up)
	}
}

// pipe copies from src to dst, holding the data while black-holed.
func (p *faultProxy) pipe(dst, src net.Conn) {
	defer dst.Close()
	defer src.Close()
	buf := make([]byte, 32<<10)
	for {
		p.gate()
		n, err := src.Read(buf)
		if n > 0 {
			p.gate()
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil { // io.EOF included: the peer closed
			return
		}
	}
}

func (p *faultProxy) close() {
	p.restore()
	p.ln.Close()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
}
