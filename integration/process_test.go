package integration

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
)

// binaryEnv is the test process's environment without OUTBOX_* variables,
// so a developer's settings cannot change what a test runs, plus extra.
func binaryEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "OUTBOX_") {
			env = append(env, kv)
		}
	}
	return append(env, extra...)
}

// process is a running `publisher run`.
type process struct {
	name   string
	cmd    *exec.Cmd
	stderr *testenv.SyncBuffer
	done   chan struct{} // closed when the process has exited
	code   int           // exit code, -1 when killed by a signal; valid after done
}

// fastFlags make the publisher poll, back off and fail over quickly.
var fastFlags = []string{
	"--poll-interval", "100ms",
	"--leader-timeout", "2s",
	"--backoff-max", "500ms",
	"--ack-timeout", "2s",
}

// startPublisher starts `publisher run` against dsn and the test's NATS
// server with fastFlags and extra flags (later flags win). Its stderr (the
// logs) is kept, and shown if the test fails; the process is killed when
// the test ends if it is still running.
func startPublisher(t *testing.T, name, dsn string, extra ...string) *process {
	t.Helper()
	args := append([]string{"run", "--database-url", dsn, "--nats-url", testenv.NATSURL()}, fastFlags...)
	return startProcess(t, name, append(args, extra...), nil)
}

// startProcess starts the publisher binary with args and extra environment.
func startProcess(t *testing.T, name string, args, env []string) *process {
	t.Helper()
	p := &process{name: name, stderr: &testenv.SyncBuffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(publisherBin, args...)
	p.cmd.Env = binaryEnv(env...)
	p.cmd.Stderr = p.stderr
	require.NoError(t, p.cmd.Start(), "start %s", name)
	go func() {
		err := p.cmd.Wait()
		p.code = 0
		var exitErr *exec.ExitError
		if errors.As(err, &exitErr) {
			p.code = exitErr.ExitCode()
		} else if err != nil {
			p.code = -1
		}
		close(p.done)
	}()
	t.Cleanup(func() {
		p.Kill()
		<-p.done
		if t.Failed() {
			t.Logf("logs of %s (pid %d):\n%s", p.name, p.cmd.Process.Pid, p.Logs())
		}
	})
	return p
}

// Logs returns what the process wrote to stderr so far.
func (p *process) Logs() string { return p.stderr.String() }

// Kill sends SIGKILL. It is a no-op once the process has exited.
func (p *process) Kill() { p.signal(syscall.SIGKILL) }

// Term sends SIGTERM.
func (p *process) Term() { p.signal(syscall.SIGTERM) }

func (p *process) signal(sig syscall.Signal) {
	select {
	case <-p.done:
	default:
		_ = p.cmd.Process.Signal(sig)
	}
}

// Wait waits up to timeout for the process to exit and returns its exit
// code (-1 when a signal killed it).
func (p *process) Wait(t *testing.T, timeout time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
		return p.code
	case <-time.After(timeout):
		t.Fatalf("%s did not exit within %s", p.name, timeout)
		return 0
	}
}

// Exited reports whether the process has exited.
func (p *process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// WaitLog waits until the logs contain substr. It fails at once if the
// process exits first.
func (p *process) WaitLog(t *testing.T, substr string, timeout time.Duration) {
	t.Helper()
	testenv.Eventually(t, timeout, func() bool {
		if strings.Contains(p.Logs(), substr) {
			return true
		}
		if p.Exited() {
			t.Fatalf("%s exited with status %d before logging %q", p.name, p.code, substr)
		}
		return false
	}, "%s never logged %q", p.name, substr)
}

// Log messages the tests wait for, as slog's text handler writes them.
const (
	logLeaderElected = `msg="leader elected"`
	logStandingBy    = `msg="standing by`
	logStopped       = `msg="publisher stopped"`
	logJoined        = `msg="joined as a partitioned publisher"`
)

var electedPID = regexp.MustCompile(`msg="leader elected" .*\bpid=(\d+)`)

// LeaderPID returns the backend pid the process logged when it was last
// elected leader, or 0.
func (p *process) LeaderPID() int {
	m := electedPID.FindAllStringSubmatch(p.Logs(), -1)
	if len(m) == 0 {
		return 0
	}
	pid, _ := strconv.Atoi(m[len(m)-1][1])
	return pid
}

// result is the outcome of a publisher command run to completion.
type result struct {
	stdout, stderr string
	code           int
}

// cli runs the publisher binary with args to completion (at most 30s) and
// returns its output and exit code.
func cli(t *testing.T, args ...string) result {
	t.Helper()
	return cliEnv(t, nil, args...)
}

// cliEnv is cli with extra environment variables ("NAME=value").
func cliEnv(t *testing.T, env []string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, publisherBin, args...)
	cmd.Env = binaryEnv(env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := result{stdout: stdout.String(), stderr: stderr.String()}
	var exitErr *exec.ExitError
	switch {
	case errors.As(err, &exitErr):
		r.code = exitErr.ExitCode()
	case err != nil:
		t.Fatalf("run publisher %v: %v", args, err)
	}
	require.NoError(t, ctx.Err(), "publisher %v did not finish within 30s", args)
	return r
}

// requireCLI runs the publisher binary and requires exit status 0.
func requireCLI(t *testing.T, args ...string) result {
	t.Helper()
	r := cli(t, args...)
	require.Zero(t, r.code, "publisher %v exited %d\nstdout:\n%s\nstderr:\n%s", args, r.code, r.stdout, r.stderr)
	return r
}
