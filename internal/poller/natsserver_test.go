package poller_test

import (
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"
)

// natsServer is an in-process NATS server with JetStream on a fixed port
// and store directory, for tests that stop and restart the broker.
type natsServer struct {
	t    *testing.T
	opts server.Options
	srv  *server.Server
}

// startNATS starts an in-process server on a free port; it is shut down
// when the test ends.
func startNATS(t *testing.T) *natsServer {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	port := l.Addr().(*net.TCPAddr).Port
	require.NoError(t, l.Close())
	s := &natsServer{t: t, opts: server.Options{
		Host: "127.0.0.1", Port: port, JetStream: true, StoreDir: t.TempDir(),
		NoLog: true, NoSigs: true,
	}}
	s.start()
	t.Cleanup(s.stop)
	return s
}

// URL is the client URL of the server.
func (s *natsServer) URL() string {
	return "nats://" + net.JoinHostPort(s.opts.Host, strconv.Itoa(s.opts.Port))
}

// start starts the server (again), keeping port and store directory.
func (s *natsServer) start() {
	s.t.Helper()
	opts := s.opts // NewServer may fill in the options it is given
	srv, err := server.NewServer(&opts)
	require.NoError(s.t, err)
	go srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		srv.Shutdown()
		s.t.Fatalf("in-process NATS server on port %d not ready", s.opts.Port)
	}
	s.srv = srv
}

// stop shuts the server down and waits until it is gone; a no-op when it is
// not running.
func (s *natsServer) stop() {
	if s.srv == nil {
		return
	}
	s.srv.Shutdown()
	s.srv.WaitForShutdown()
	s.srv = nil
}

// connect returns a client connection that reconnects forever and buffers
// nothing while it does (see poller.Config.NATS), closed when
// the test ends.
func (s *natsServer) connect(t *testing.T) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	nc, err := nats.Connect(s.URL(), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond),
		nats.ReconnectBufSize(-1)) // as poller.Config.NATS requires
	require.NoError(t, err)
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	return nc, js
}
