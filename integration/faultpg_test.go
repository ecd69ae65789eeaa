//go:build faults

package integration

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/schema"
)

// pgCluster is a throwaway PostgreSQL cluster the test owns (initdb in a
// temporary directory, its own port, trust authentication), so the test
// can restart or crash the server. As root, initdb, pg_ctl and postgres
// run as the postgres user through runuser (they refuse to run as root).
type pgCluster struct {
	t    *testing.T
	dir  string // holds data/, the socket and postgres.log
	bin  string // directory of initdb and pg_ctl
	port int
	user string // run the tools as this user through runuser; "" as this process
}

// pgBinDirs are searched for initdb and pg_ctl after PATH.
var pgBinDirs = []string{"/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/usr/local/pgsql/bin"}

// findPGBin returns the first directory holding both initdb and pg_ctl,
// after symbolic links: the directory of the real initdb, which also holds
// the other server tools (pg_basebackup), where a PATH directory may hold
// links to a few of them.
func findPGBin() (string, bool) {
	dir, ok := findPGBinLink()
	if !ok {
		return "", false
	}
	if real, err := filepath.EvalSymlinks(filepath.Join(dir, "initdb")); err == nil {
		dir = filepath.Dir(real)
	}
	return dir, true
}

func findPGBinLink() (string, bool) {
	has := func(dir string) bool {
		for _, name := range []string{"initdb", "pg_ctl"} {
			fi, err := os.Stat(filepath.Join(dir, name))
			if err != nil || fi.IsDir() || fi.Mode().Perm()&0o111 == 0 {
				return false
			}
		}
		return true
	}
	for _, dir := range filepath.SplitList(os.Getenv("PATH")) {
		if dir != "" && has(dir) {
			return dir, true
		}
	}
	for _, g := range pgBinDirs {
		dirs, _ := filepath.Glob(g)
		slices.Sort(dirs)
		slices.Reverse(dirs) // newest version first (good enough for 1x versions)
		for _, dir := range dirs {
			if has(dir) {
				return dir, true
			}
		}
	}
	return "", false
}

// startPGCluster initdbs a cluster in t.TempDir(), starts it on a free
// port of 127.0.0.1 and stops it when the test ends. It fails the test (it
// never skips) when the PostgreSQL server binaries are not found.
func startPGCluster(t *testing.T) *pgCluster {
	t.Helper()
	c := newPGCluster(t)
	c.initdb()
	c.start()
	return c
}

// newPGCluster finds the server binaries and gives a cluster its directory
// (owned by the user the tools run as) and a free port; it creates no data
// directory and starts nothing.
func newPGCluster(t *testing.T) *pgCluster {
	t.Helper()
	bin, ok := findPGBin()
	if !ok {
		t.Fatalf("this scenario starts its own PostgreSQL server, but no initdb and pg_ctl were found on PATH or in %s; "+
			"install the PostgreSQL server (Debian/Ubuntu: apt-get install postgresql)", strings.Join(pgBinDirs, ", "))
	}
	c := &pgCluster{t: t, dir: t.TempDir(), bin: bin}
	c.user = runAsPostgres(t, c.dir)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c.port = l.Addr().(*net.TCPAddr).Port
	l.Close()
	return c
}

// initdb creates the cluster's data directory, trusting every local login.
func (c *pgCluster) initdb() {
	c.t.Helper()
	if out, err := c.run("initdb", "-D", c.data(), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"); err != nil {
		c.t.Fatalf("initdb: %v\n%s", err, out)
	}
}

// start starts the server on its port, with extra postgres options
// ("-c name=value"), and stops it (-m immediate) when the test ends.
func (c *pgCluster) start(extra ...string) {
	c.t.Helper()
	// fsync=off: an immediate shutdown kills the server's processes, not
	// the machine, so what they wrote is in the page cache and crash
	// recovery replays it; the OS crash fsync guards against is not
	// simulated here.
	opts := fmt.Sprintf("-k '%s' -p %d -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200", c.dir, c.port)
	for _, o := range extra {
		opts += " " + o
	}
	if out, err := c.run("pg_ctl", "start", "-D", c.data(), "-l", c.log(), "-w", "-t", "30", "-o", opts); err != nil {
		log, _ := os.ReadFile(c.log())
		c.t.Fatalf("pg_ctl start: %v\n%s\n%s", err, out, log)
	}
	c.t.Cleanup(func() {
		if out, err := c.run("pg_ctl", "stop", "-D", c.data(), "-m", "immediate", "-w", "-t", "20"); err != nil &&
			!strings.Contains(out, "Is server running?") {
			c.t.Logf("pg_ctl stop: %v\n%s", err, out)
		}
	})
}

func (c *pgCluster) data() string { return filepath.Join(c.dir, "data") }
func (c *pgCluster) log() string  { return filepath.Join(c.dir, "postgres.log") }

// DSN connects to the cluster's postgres database.
func (c *pgCluster) DSN() string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", c.port)
}

// run runs one of the cluster's tools (as the postgres user when root).
func (c *pgCluster) run(tool string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	name := filepath.Join(c.bin, tool)
	var cmd *exec.Cmd
	if c.user != "" {
		cmd = exec.CommandContext(ctx, "runuser", append([]string{"-u", c.user, "--", name}, args...)...)
	} else {
		cmd = exec.CommandContext(ctx, name, args...)
	}
	cmd.Dir = c.dir // the postgres user may not enter the test's directory
	// postgres, started by pg_ctl, outlives the command: do not wait on
	// output pipes it may have inherited.
	cmd.WaitDelay = 2 * time.Second
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// restartImmediate restarts the server with `pg_ctl restart -m immediate`
// (every backend killed at once, crash recovery at start) and returns how
// long pg_ctl took until the server accepted connections again.
func (c *pgCluster) restartImmediate() time.Duration {
	c.t.Helper()
	began := time.Now()
	if out, err := c.run("pg_ctl", "restart", "-D", c.data(), "-m", "immediate", "-w", "-t", "30", "-l", c.log()); err != nil {
		log, _ := os.ReadFile(c.log())
		c.t.Fatalf("pg_ctl restart: %v\n%s\n%s", err, out, log)
	}
	return time.Since(began)
}

// newDB creates a schema in the cluster, migrates the outbox tables into
// it and returns it as a testenv.DB (DSN with search_path set).
func (c *pgCluster) newDB(t *testing.T) *testenv.DB {
	t.Helper()
	name := "t_" + testenv.Suffix()
	admin, err := sqlx.Open("postgres", c.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	if _, err := admin.Exec(`CREATE SCHEMA ` + name); err != nil {
		t.Fatalf("create schema in the throwaway cluster: %v", err)
	}
	dsn := schema.WithSearchPath(c.DSN(), name)
	db, err := sqlx.Open("postgres", dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	if _, err := schema.Migrate(context.Background(), db.DB, schema.Tables{}); err != nil {
		t.Fatalf("migrate the throwaway cluster: %v", err)
	}
	return &testenv.DB{DB: db, DSN: dsn, Schema: name}
}
