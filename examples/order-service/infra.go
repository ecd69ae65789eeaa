package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	_ "github.com/lib/pq" // PostgreSQL driver
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgnats/outbox/internal/redact"
)

// Defaults for local development, overridden by DATABASE_URL and NATS_URL.
const (
	defaultDatabaseURL = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
	defaultNATSURL     = nats.DefaultURL
)

// pingTimeout bounds the first contact with a configured server: the demo
// falls back to a server of its own when none answers quickly.
const pingTimeout = 2 * time.Second

// postgresBinGlobs are where distributions install PostgreSQL's server
// binaries; they are searched after PATH, newest version first.
var postgresBinGlobs = []string{
	"/usr/lib/postgresql/*/bin",         // Debian, Ubuntu
	"/usr/pgsql-*/bin",                  // PGDG RPMs
	"/usr/local/pgsql/bin",              // built from source
	"/opt/homebrew/opt/postgresql*/bin", // Homebrew, Apple silicon
	"/usr/local/opt/postgresql*/bin",    // Homebrew, Intel
	"/opt/local/lib/postgresql*/bin",    // MacPorts
	"/Applications/Postgres.app/Contents/Versions/*/bin",
}

// installHint says how to get a PostgreSQL the demo can use.
const installHint = "start PostgreSQL and point DATABASE_URL (or --database-url) at it, " +
	"or install the PostgreSQL server so the demo can start a throwaway one " +
	"(Debian/Ubuntu: apt-get install postgresql; Fedora/RHEL: dnf install postgresql-server; macOS: brew install postgresql)"

// postgres is the database the demo runs against: the configured server, or
// a throwaway cluster that Close stops and removes.
type postgres struct {
	DSN     string // to connect; may hold a password
	About   string // to print: no password
	cluster *cluster
}

// Close stops and removes the throwaway cluster, if the demo started one.
func (p *postgres) Close(out io.Writer) error {
	if p.cluster == nil {
		return nil
	}
	if err := p.cluster.stop(); err != nil {
		return fmt.Errorf("remove throwaway PostgreSQL cluster in %s: %w", p.cluster.dir, err)
	}
	fmt.Fprintf(out, "stopped and removed the throwaway PostgreSQL cluster in %s\n", p.cluster.dir)
	return nil
}

// binSearch says where to look for PostgreSQL's initdb and pg_ctl: each
// directory of Path (a PATH-style list), then each directory matching
// Globs.
type binSearch struct {
	Path  string
	Globs []string
}

// openPostgres returns the PostgreSQL at dsn if it answers, or else starts
// a throwaway cluster from the binaries bins finds. It reports what it does
// on out.
func openPostgres(ctx context.Context, dsn string, bins binSearch, out io.Writer) (*postgres, error) {
	// The driver's message may quote the DSN (cut short when a password
	// holds an unescaped '#'): keep its password out of what is printed.
	pingErr := redact.NewScrubber([]string{dsn}, nil, nil).Error(pingPostgres(ctx, dsn))
	if pingErr == nil {
		return &postgres{DSN: dsn, About: redact.DSN(dsn)}, nil
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	dir, ok := bins.find()
	if !ok {
		return nil, fmt.Errorf("PostgreSQL: none answers at %s (%v), and no initdb and pg_ctl to start a throwaway one were found on PATH or in %s.\n  To fix: %s",
			redact.DSN(dsn), pingErr, strings.Join(bins.Globs, ", "), installHint)
	}
	as, err := unprivileged()
	if err != nil {
		return nil, fmt.Errorf("PostgreSQL: none answers at %s (%v), and a throwaway cluster cannot be started: %w", redact.DSN(dsn), pingErr, err)
	}
	fmt.Fprintf(out, "PostgreSQL: none answers at %s (%v); starting a throwaway cluster with %s%s\n",
		redact.DSN(dsn), pingErr, dir, as)
	c, err := startCluster(ctx, dir, as)
	if err != nil {
		return nil, fmt.Errorf("PostgreSQL: start a throwaway cluster with %s: %w\n  To fix: %s", dir, err, installHint)
	}
	dsn = fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", c.port)
	if err := pingPostgres(ctx, dsn); err != nil {
		return nil, errors.Join(fmt.Errorf("PostgreSQL: throwaway cluster in %s does not answer: %w", c.dir, err), c.stop())
	}
	return &postgres{DSN: dsn, About: redact.DSN(dsn) + " (throwaway cluster in " + c.dir + ")", cluster: c}, nil
}

func pingPostgres(ctx context.Context, dsn string) error {
	db, err := sql.Open("postgres", dsn)
	if err != nil {
		return err
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(ctx, pingTimeout)
	defer cancel()
	return db.PingContext(ctx)
}

// find returns the first directory holding both initdb and pg_ctl.
func (b binSearch) find() (string, bool) {
	for _, dir := range filepath.SplitList(b.Path) {
		if dir != "" && hasPostgresBins(dir) {
			return dir, true
		}
	}
	for _, g := range b.Globs {
		dirs, _ := filepath.Glob(g)
		slices.SortFunc(dirs, func(a, b string) int { return slices.Compare(versionOf(b), versionOf(a)) })
		for _, dir := range dirs {
			if hasPostgresBins(dir) {
				return dir, true
			}
		}
	}
	return "", false
}

func hasPostgresBins(dir string) bool {
	for _, name := range []string{"initdb", "pg_ctl"} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil || fi.IsDir() || fi.Mode().Perm()&0o111 == 0 {
			return false
		}
	}
	return true
}

var digits = regexp.MustCompile(`\d+`)

// versionOf returns the numbers in a path, so that .../postgresql/15/bin
// sorts after .../postgresql/9.6/bin.
func versionOf(path string) []int {
	var v []int
	for _, d := range digits.FindAllString(path, -1) {
		n, _ := strconv.Atoi(d)
		v = append(v, n)
	}
	return v
}

// runAs runs PostgreSQL's tools as an unprivileged user when this process
// is root, since initdb and postgres refuse to run as root. Its zero value
// runs them as this process.
type runAs struct {
	user     string // empty: as this process
	uid, gid int
	via      string // runuser or su
}

// String describes the user for a progress line.
func (r runAs) String() string {
	if r.user == "" {
		return ""
	}
	return " (as user " + r.user + ", via " + filepath.Base(r.via) + ", since initdb refuses to run as root)"
}

// unprivileged returns how to run PostgreSQL's tools from this process.
func unprivileged() (runAs, error) {
	if os.Geteuid() != 0 {
		return runAs{}, nil
	}
	var via string
	for _, name := range []string{"runuser", "/usr/sbin/runuser", "/sbin/runuser", "su", "/bin/su", "/usr/bin/su"} {
		if p, err := exec.LookPath(name); err == nil {
			via = p
			break
		}
	}
	for _, name := range []string{"postgres", "nobody"} {
		u, err := user.Lookup(name)
		if err != nil {
			continue
		}
		uid, err1 := strconv.Atoi(u.Uid)
		gid, err2 := strconv.Atoi(u.Gid)
		if err1 != nil || err2 != nil || uid == 0 || via == "" {
			continue
		}
		return runAs{user: name, uid: uid, gid: gid, via: via}, nil
	}
	return runAs{}, errors.New("initdb and postgres refuse to run as root, and no unprivileged user (postgres, nobody) " +
		"with runuser or su was found to run them as; run the demo as an ordinary user")
}

// command returns the command running name with args as r's user, in dir.
func (r runAs) command(ctx context.Context, dir, name string, args ...string) *exec.Cmd {
	var cmd *exec.Cmd
	switch {
	case r.user == "":
		cmd = exec.CommandContext(ctx, name, args...)
	case filepath.Base(r.via) == "runuser":
		cmd = exec.CommandContext(ctx, r.via, append([]string{"-u", r.user, "--", name}, args...)...)
	default:
		words := []string{shellQuote(name)}
		for _, a := range args {
			words = append(words, shellQuote(a))
		}
		cmd = exec.CommandContext(ctx, r.via, "-s", "/bin/sh", "-c", strings.Join(words, " "), r.user)
	}
	// The user may not be able to enter this process's directory.
	cmd.Dir = dir
	// postgres, started by pg_ctl, outlives the command: never wait on
	// output pipes it might have inherited.
	cmd.WaitDelay = 2 * time.Second
	return cmd
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// cluster is a throwaway PostgreSQL cluster in a temporary directory.
type cluster struct {
	dir     string // holds data/, the socket and postgres.log
	bin     string
	port    int
	as      runAs
	started bool
}

func (c *cluster) data() string { return filepath.Join(c.dir, "data") }
func (c *cluster) log() string  { return filepath.Join(c.dir, "postgres.log") }

// startCluster runs initdb in a new temporary directory and starts
// postgres there on a free port of 127.0.0.1. On error nothing is left
// behind.
func startCluster(ctx context.Context, bin string, as runAs) (_ *cluster, err error) {
	dir, err := os.MkdirTemp("", "order-service-pg-")
	if err != nil {
		return nil, err
	}
	c := &cluster{dir: dir, bin: bin, as: as}
	defer func() {
		if err != nil {
			err = errors.Join(err, c.stop())
		}
	}()
	if as.user != "" {
		if err := os.Chown(dir, as.uid, as.gid); err != nil {
			return nil, fmt.Errorf("give %s to user %s: %w", dir, as.user, err)
		}
	}
	if c.port, err = freePort(); err != nil {
		return nil, err
	}

	initdb := c.as.command(ctx, dir, filepath.Join(bin, "initdb"),
		"-D", c.data(), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync")
	if out, err := initdb.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("initdb: %w\n%s", err, tail(out))
	}
	// pg_ctl hands -o to a shell: quote the directory.
	opts := fmt.Sprintf("-k %s -p %d -c listen_addresses=127.0.0.1 -c fsync=off", shellQuote(dir), c.port)
	start := c.as.command(ctx, dir, filepath.Join(bin, "pg_ctl"),
		"start", "-D", c.data(), "-l", c.log(), "-w", "-t", "30", "-o", opts)
	c.started = true // stop even if start reports failure: postgres may be up
	if out, err := start.CombinedOutput(); err != nil {
		log, _ := os.ReadFile(c.log())
		return nil, fmt.Errorf("pg_ctl start: %w\n%s%s", err, tail(out), tail(log))
	}
	return c, nil
}

// stop stops postgres, if it was started, and removes the directory.
func (c *cluster) stop() error {
	var errs []error
	if c.started {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		stop := c.as.command(ctx, c.dir, filepath.Join(c.bin, "pg_ctl"), "stop", "-D", c.data(), "-m", "fast", "-w", "-t", "20")
		if out, err := stop.CombinedOutput(); err != nil {
			if _, statErr := os.Stat(filepath.Join(c.data(), "postmaster.pid")); statErr == nil {
				errs = append(errs, fmt.Errorf("pg_ctl stop: %w\n%s", err, tail(out)))
			}
		}
		c.started = false
	}
	if err := os.RemoveAll(c.dir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// tail returns the last lines of a command's output, for an error message.
func tail(out []byte) string {
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) > 15 {
		lines = lines[len(lines)-15:]
	}
	s := strings.Join(lines, "\n")
	if s == "" {
		return ""
	}
	return "  | " + strings.ReplaceAll(s, "\n", "\n  | ") + "\n"
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// broker is the NATS server the demo runs against: the configured one, or
// an in-process server that Close shuts down.
type broker struct {
	Conn  *nats.Conn
	About string
	srv   *server.Server
	dir   string
}

// Close closes the connection and shuts the in-process server down.
func (b *broker) Close() error {
	if b.Conn != nil {
		b.Conn.Close()
	}
	if b.srv == nil {
		return nil
	}
	b.srv.Shutdown()
	b.srv.WaitForShutdown()
	return os.RemoveAll(b.dir)
}

// connectNATS connects to the NATS server at url if it answers and has
// JetStream, or else starts an in-process server with JetStream. It reports
// a fallback on out.
func connectNATS(ctx context.Context, url string, out io.Writer) (*broker, error) {
	nc, err := nats.Connect(url, nats.Timeout(pingTimeout), nats.Name("order-service demo"), nats.ReconnectBufSize(-1))
	if err == nil {
		err = checkJetStream(ctx, nc)
		if err == nil {
			return &broker{Conn: nc, About: redact.NATS(url)}, nil
		}
		nc.Close()
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	err = redact.NewScrubber(nil, []string{url}, nil).Error(err)
	fmt.Fprintf(out, "NATS: no JetStream at %s (%v); starting an in-process server with JetStream\n", redact.NATS(url), err)
	return startNATS(ctx)
}

func checkJetStream(ctx context.Context, nc *nats.Conn) error {
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, pingTimeout)
	defer cancel()
	_, err = js.AccountInfo(ctx)
	return err
}

func startNATS(ctx context.Context) (*broker, error) {
	dir, err := os.MkdirTemp("", "order-service-nats-")
	if err != nil {
		return nil, err
	}
	srv, err := server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: server.RANDOM_PORT, JetStream: true, StoreDir: dir,
		NoLog: true, NoSigs: true,
	})
	if err != nil {
		return nil, errors.Join(fmt.Errorf("NATS: in-process server: %w", err), os.RemoveAll(dir))
	}
	b := &broker{srv: srv, dir: dir}
	go srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		err = errors.New("not ready within 10s")
	} else if b.Conn, err = nats.Connect(srv.ClientURL(), nats.Name("order-service demo"), nats.ReconnectBufSize(-1)); err == nil {
		err = checkJetStream(ctx, b.Conn)
	}
	if err != nil {
		return nil, errors.Join(fmt.Errorf("NATS: in-process server: %w", err), b.Close())
	}
	b.About = srv.ClientURL() + " (in-process server, JetStream in " + dir + ")"
	return b, nil
}
