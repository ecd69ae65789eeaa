package testenv

import (
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// NATSServer is an in-process NATS server for tests that must stop,
// restart or configure the broker. A restart keeps its port and store
// directory, so file-backed streams survive it.
type NATSServer struct {
	t    testing.TB
	opts server.Options
	srv  *server.Server
}

// StartNATSServer starts an in-process server on a free loopback port and
// shuts it down when the test ends. opts configures it (authentication,
// TLS, ...); nil means JetStream with a store in a temporary directory.
// Host, port, logging and signals are always set here.
func StartNATSServer(t testing.TB, opts *server.Options) *NATSServer {
	t.Helper()
	if opts == nil {
		opts = &server.Options{JetStream: true}
	}
	if opts.JetStream && opts.StoreDir == "" {
		opts.StoreDir = t.TempDir()
	}
	// Port -1: the server picks a free port; Start records it, so a
	// restart binds the same one.
	opts.Host, opts.Port, opts.NoLog, opts.NoSigs = "127.0.0.1", -1, true, true
	s := &NATSServer{t: t, opts: *opts}
	s.Start()
	t.Cleanup(s.Stop)
	return s
}

// Addr is the server's host:port.
func (s *NATSServer) Addr() string { return net.JoinHostPort(s.opts.Host, strconv.Itoa(s.opts.Port)) }

// URL is the server's client URL, without credentials.
func (s *NATSServer) URL() string { return "nats://" + s.Addr() }

// Start starts the server (again), on the same port and store.
func (s *NATSServer) Start() {
	s.t.Helper()
	opts := s.opts // NewServer may change the options it is given
	srv, err := server.NewServer(&opts)
	if err != nil {
		s.t.Fatalf("in-process NATS server: %v", err)
	}
	go srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		srv.Shutdown()
		s.t.Fatalf("in-process NATS server on port %d not ready", s.opts.Port)
	}
	s.srv = srv
	s.opts.Port = srv.Addr().(*net.TCPAddr).Port
	if a := srv.ClusterAddr(); a != nil {
		s.opts.Cluster.Port = a.Port // Cluster.Port -1 picked a free one
	}
}

// ClusterAddr is the host:port the server accepts routes on, or "" when it
// does not cluster. Like the client port, it survives a restart.
func (s *NATSServer) ClusterAddr() string {
	if s.opts.Cluster.Port == 0 {
		return ""
	}
	return net.JoinHostPort(s.opts.Cluster.Host, strconv.Itoa(s.opts.Cluster.Port))
}

// Server is the running server, or nil while it is stopped: for tests
// that ask it about its connections or its JetStream cluster.
func (s *NATSServer) Server() *server.Server { return s.srv }

// Stop shuts the server down and waits until it is gone; a no-op when it
// is not running.
func (s *NATSServer) Stop() {
	if s.srv == nil {
		return
	}
	s.srv.Shutdown()
	s.srv.WaitForShutdown()
	s.srv = nil
}

// Connect returns a connection that reconnects forever and buffers nothing
// while it does (as the publisher requires), closed when the test ends.
func (s *NATSServer) Connect(t testing.TB) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	nc, err := nats.Connect(s.URL(), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond),
		nats.ReconnectBufSize(-1))
	if err != nil {
		t.Fatalf("connect to in-process NATS: %v", err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatalf("jetstream: %v", err)
	}
	return nc, js
}
