package integration

import (
	"cmp"
	"context"
	"fmt"
	"maps"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// runAsPostgres prepares dir for server tools that refuse to run as root
// (initdb, postgres, pgbouncer): as root it hands dir to the postgres user,
// lets that user through dir's parent (t.TempDir's parent is private to
// root) and returns "postgres", the user to run them as through runuser;
// otherwise it returns "" (run them as this process).
func runAsPostgres(t *testing.T, dir string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		return ""
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		t.Fatalf("running as root, the server tools must run as user postgres, which does not exist: %v", err)
	}
	if _, err := exec.LookPath("runuser"); err != nil {
		t.Fatalf("running as root, the server tools must run as user postgres through runuser, not found: %v", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if err := os.Chmod(filepath.Dir(dir), 0o711); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, uid, gid); err != nil {
		t.Fatal(err)
	}
	return "postgres"
}

// freePort returns a TCP port of 127.0.0.1 free at the call.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// findPgBouncer returns the pgbouncer binary (PATH, then /usr/sbin, where
// Debian's package puts it), failing the test, never skipping, when it is
// missing: `make deps` installs it.
func findPgBouncer(t *testing.T) string {
	t.Helper()
	if p, err := exec.LookPath("pgbouncer"); err == nil {
		return p
	}
	if fi, err := os.Stat("/usr/sbin/pgbouncer"); err == nil && !fi.IsDir() {
		return "/usr/sbin/pgbouncer"
	}
	t.Fatal("pgbouncer not found on PATH or in /usr/sbin: run `make deps` (as root: apt-get install pgbouncer)")
	return ""
}

// startPgBouncer starts a PgBouncer the test owns (its configuration in
// t.TempDir(), its own port, auth_type trust) in front of the test
// database db, in pool mode mode ("session" or "transaction"), with at
// most poolSize server connections. Its one database, "outbox", is the
// test database; a client names db's schema in its table names (a
// search_path in the DSN is a startup parameter PgBouncer does not pass
// on, and session pooling resets it with DISCARD ALL between clients). It
// returns the DSN of that database through the pooler and stops PgBouncer
// when the test ends.
func startPgBouncer(t *testing.T, db *testenv.DB, mode string, poolSize int) string {
	t.Helper()
	bin := findPgBouncer(t)
	dir := t.TempDir()
	runAs := runAsPostgres(t, dir)
	up, err := url.Parse(testenv.DatabaseURL())
	require.True(t, err == nil && (up.Scheme == "postgres" || up.Scheme == "postgresql"),
		"DATABASE_URL must be a postgres:// URL for the PgBouncer tests")
	backend := fmt.Sprintf("host=%s port=%s dbname=%s user=%s", cmp.Or(up.Hostname(), "127.0.0.1"), cmp.Or(up.Port(), "5432"),
		strings.TrimPrefix(up.Path, "/"), cmp.Or(up.User.Username(), "postgres"))
	if pw, ok := up.User.Password(); ok {
		backend += " password=" + pw
	}
	port := freePort(t)
	ini := fmt.Sprintf(`[databases]
outbox = %s

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = trust
auth_file = %s
pool_mode = %s
default_pool_size = %d
max_client_conn = 100
logfile = %s
ignore_startup_parameters = extra_float_digits
`, backend, port, filepath.Join(dir, "users.txt"), mode, poolSize, filepath.Join(dir, "pgbouncer.log"))
	login := cmp.Or(up.User.Username(), "postgres")
	for name, text := range map[string]string{"pgbouncer.ini": ini, "users.txt": fmt.Sprintf("%q \"\"\n", login)} {
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644))
	}
	args := []string{bin, filepath.Join(dir, "pgbouncer.ini")}
	if runAs != "" {
		args = append([]string{"runuser", "-u", runAs, "--"}, args...)
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // stopped with its runuser as a group
	out := &testenv.SyncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	require.NoError(t, cmd.Start(), "start pgbouncer")
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGINT) // pgbouncer: SIGINT is a safe shutdown
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
		if t.Failed() {
			log, _ := os.ReadFile(filepath.Join(dir, "pgbouncer.log"))
			t.Logf("pgbouncer (%s pooling) output:\n%s\n%s", mode, out.String(), log)
		}
	})
	dsn := fmt.Sprintf("postgres://%s@127.0.0.1:%d/outbox?sslmode=disable", url.PathEscape(login), port)
	probe, err := sqlx.Open("postgres", dsn)
	require.NoError(t, err)
	defer probe.Close()
	testenv.Eventually(t, 10*time.Second, func() bool {
		select {
		case <-done:
			log, _ := os.ReadFile(filepath.Join(dir, "pgbouncer.log"))
			t.Fatalf("pgbouncer exited:\n%s\n%s", out.String(), log)
		default:
		}
		return probe.Ping() == nil
	}, "pgbouncer did not accept connections on port %d", port)
	return dsn
}

// TestPgBouncer runs the outbox behind PgBouncer: services writing through
// transaction pooling, the publisher through session pooling, and the
// publisher refused at start when pointed at transaction pooling, whose
// server connections change under its session locks and LISTEN.
func TestPgBouncer(t *testing.T) {
	t.Parallel()

	t.Run("writers through transaction pooling", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		// Four writers share two server connections: each transaction
		// takes whichever is free.
		pooled, err := sqlx.Open("postgres", startPgBouncer(t, b.db, "transaction", 2))
		require.NoError(t, err)
		t.Cleanup(func() { pooled.Close() })
		w, err := outbox.NewWriter(outbox.Config{Table: b.db.Schema + ".events"})
		require.NoError(t, err)
		startPublisher(t, "publisher", b.db.DSN)
		const writers, perWriter = 4, 50
		var wg sync.WaitGroup
		errs := make(chan error, writers)
		seqs := make([]*seqWriter, writers)
		for i := range writers {
			s := b.seqWriter(b.prefix+".order.updated", entityNames(fmt.Sprintf("w%d-", i), 5), uint64(i))
			s.db, s.w = pooled, w
			seqs[i] = s
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs <- s.write(context.Background(), perWriter, 5)
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			require.NoError(t, err, "write through transaction pooling")
		}
		b.waitAllSuccess(t, writers*perWriter, 30*time.Second)
		want := map[string]int{}
		for _, s := range seqs {
			maps.Copy(want, s.next)
		}
		requireInOrder(t, readStream(t, b.js, b.stream), want)
	})

	t.Run("publisher through session pooling", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		// A poll interval of an hour: events written once the publisher
		// sleeps are published only if its LISTEN hears the NOTIFY.
		p := startPublisher(t, "publisher", startPgBouncer(t, b.db, "session", 10),
			"--table", b.db.Schema+".events", "--poll-interval", "1h")
		p.WaitLog(t, logLeaderElected, 15*time.Second)
		first := b.writeAll(t, entityNames("e", 5), 30)
		b.waitAllSuccess(t, first.written(), 30*time.Second)
		testenv.Eventually(t, 10*time.Second, func() bool { return b.db.Sleeping(t) },
			"the idle publisher sleeps on the sleep lock, waiting for a NOTIFY")
		require.NoError(t, first.write(context.Background(), 30, 5))
		b.waitAllSuccess(t, first.written(), 30*time.Second)
		requireInOrder(t, readStream(t, b.js, b.stream), first.next)
	})

	t.Run("publisher refused on transaction pooling", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		// Everything else right (table, NATS, events waiting), so that
		// only the pooler can stop it.
		b.writeAll(t, entityNames("e", 3), 10)
		p := startPublisher(t, "publisher", startPgBouncer(t, b.db, "transaction", 5), "--table", b.db.Schema+".events")
		code := p.Wait(t, 15*time.Second)
		require.Equal(t, 2, code, "exit status; stderr:\n%s", p.Logs())
		t.Logf("publisher refused, as it should:\n%s", p.Logs())
		require.Contains(t, p.Logs(), "do not keep their session")
		require.Contains(t, p.Logs(), "pool_mode = session")
		require.NotContains(t, p.Logs(), logLeaderElected)
		require.Zero(t, b.db.Count(t, "SUCCESS"))
	})
}
