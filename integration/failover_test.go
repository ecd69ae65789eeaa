package integration

import (
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
)

// TestFailover starts two publishers on one table: one leads, the other
// stands by. After the leader is killed with SIGKILL the standby takes over
// within seconds and publishes what is left, including events written after
// the kill; every event reaches the stream once, in order per entity.
func TestFailover(t *testing.T) {
	t.Parallel()
	b := setup(t)
	entities := entityNames("e", 20)
	w := b.seqWriter(b.prefix+".order.updated", entities, 1)
	require.NoError(t, w.write(t.Context(), 1000, 20))

	// Small batches keep the leader busy for a while.
	flags := []string{"--batch-size", "20"}
	pa := startPublisher(t, "publisher A", b.db.DSN, flags...)
	pb := startPublisher(t, "publisher B", b.db.DSN, flags...)

	var leader, standby *process
	testenv.Eventually(t, 15*time.Second, func() bool {
		a, bb := pa.Logs(), pb.Logs()
		switch {
		case strings.Contains(a, logLeaderElected) && strings.Contains(bb, logStandingBy):
			leader, standby = pa, pb
		case strings.Contains(bb, logLeaderElected) && strings.Contains(a, logStandingBy):
			leader, standby = pb, pa
		}
		return leader != nil
	}, "expected one publisher to log %q and the other %q", logLeaderElected, logStandingBy)
	require.NotContains(t, standby.Logs(), logLeaderElected, "both publishers were elected")
	require.NotContains(t, leader.Logs(), logStandingBy, "the leader also stood by")

	pid := leader.LeaderPID()
	require.NotZero(t, pid)
	require.Equal(t, pid, statusLeaderPID(t, b.db.DSN), "status shows the leader's lock session")

	testenv.Eventually(t, 30*time.Second, func() bool { return b.db.Count(t, "SUCCESS") > 0 },
		"the leader published nothing")
	leader.Kill()
	require.Equal(t, -1, leader.Wait(t, 10*time.Second))
	require.NoError(t, w.write(t.Context(), 500, 20), "write after the kill")

	standby.WaitLog(t, logLeaderElected, 15*time.Second)
	newPID := standby.LeaderPID()
	require.NotEqual(t, pid, newPID)
	require.Equal(t, newPID, statusLeaderPID(t, b.db.DSN), "status shows the new leader")

	b.waitAllSuccess(t, 1500, 60*time.Second)
	msgs := readStream(t, b.js, b.stream)
	requireEachOnce(t, msgs, b.db.IDs(t, ""))
	requireInOrder(t, msgs, w.next)
}

var statusLeader = regexp.MustCompile(`(?m)^leader\s+backend pid (\d+)`)

// statusLeaderPID runs `publisher status` and returns the leader's backend
// pid it shows, failing if it shows none.
func statusLeaderPID(t *testing.T, dsn string) int {
	t.Helper()
	r := requireCLI(t, "status", "--database-url", dsn)
	m := statusLeader.FindStringSubmatch(r.stdout)
	require.NotNil(t, m, "status shows no leader:\n%s", r.stdout)
	pid, err := strconv.Atoi(m[1])
	require.NoError(t, err)
	return pid
}
