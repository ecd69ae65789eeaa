package bench

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/PID/stat on
// Linux.
const clockTicks = 100

// idle starts the publisher binary on the (empty) scratch table with its
// default settings and, once it leads, measures its CPU over IdleFor and its
// resident memory at the end.
func (e *env) idle(ctx context.Context) (cpuPercent, rssMiB float64, err error) {
	if err := e.reset(ctx); err != nil {
		return 0, 0, err
	}
	var logs lockedBuffer
	cmd := exec.CommandContext(ctx, e.cfg.PublisherBin, "run")
	// Through the environment: the command line, which other users of
	// the host can read, would show passwords and tokens.
	cmd.Env = append(os.Environ(), append(e.cfg.PublisherEnv,
		"OUTBOX_DATABASE_URL="+e.dsn, "OUTBOX_NATS_URL="+e.cfg.NATSURL)...)
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		return 0, 0, err
	}
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	}()
	if err := waitFor(ctx, 15*time.Second, func() (bool, error) {
		return strings.Contains(logs.String(), "leader elected"), nil
	}); err != nil {
		return 0, 0, fmt.Errorf("publisher did not start: %w; its log:\n%s", err, logs.String())
	}
	pid := cmd.Process.Pid
	t0, err := cpuTicks(pid)
	if err != nil {
		return 0, 0, err
	}
	e.prog.start("idle publisher", int(e.cfg.IdleFor/time.Second))
	start := time.Now()
	for i := 1; time.Since(start) < e.cfg.IdleFor; i++ {
		select {
		case <-ctx.Done():
			return 0, 0, ctx.Err()
		case <-time.After(time.Second):
		}
		e.prog.set(i)
	}
	t1, err := cpuTicks(pid)
	if err != nil {
		return 0, 0, err
	}
	elapsed := time.Since(start)
	e.prog.done()
	rss, err := StatusKiB(pid, "VmRSS")
	if err != nil {
		return 0, 0, err
	}
	return float64(t1-t0) / clockTicks / elapsed.Seconds() * 100, float64(rss) / 1024, nil
}

// cpuTicks returns utime+stime of a process.
func cpuTicks(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("read process CPU (Linux /proc only): %w", err)
	}
	// Fields after the command name, which is in parentheses and may hold
	// spaces: state is field 3, utime 14, stime 15.
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("unexpected /proc/%d/stat", pid)
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("unexpected /proc/%d/stat", pid)
	}
	return ut + st, nil
}

// StatusKiB returns a memory field of a process's /proc/PID/status, in
// KiB: "VmRSS" (resident set size now) or "VmHWM" (its peak), for example.
func StatusKiB(pid int, field string) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			return strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, pid)
}

// lockedBuffer collects a child's stderr while the bench reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
