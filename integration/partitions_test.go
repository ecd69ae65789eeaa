package integration

import (
	"encoding/json"
	"fmt"
	"regexp"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
)

// TestPartitionedReplicas runs three publishers with --partitions: each
// reports its share on /readyz and in `publisher status`, every one
// publishes, and when one is killed the other two take its share and
// publish what is left. Every event reaches the stream once, in order per
// entity.
func TestPartitionedReplicas(t *testing.T) {
	t.Parallel()
	b := setup(t)
	entities := entityNames("e", 30)
	w := b.seqWriter(b.prefix+".order.updated", entities, 1)

	ps := make([]*process, 3)
	bases := make([]string, 3)
	for i := range ps {
		ps[i] = startPublisher(t, fmt.Sprintf("replica %d", i+1), b.db.DSN,
			append([]string{"--partitions", "6", "--replica-id", fmt.Sprintf("r%d", i+1), "--batch-size", "20"}, metricsFlags...)...)
		bases[i] = httpBase(t, ps[i])
	}
	shares := func(want ...int) func() bool {
		return func() bool {
			for i, base := range bases[:len(want)] {
				code, r := readyz(t, base)
				if code != 200 || r["role"] != "replica" || r["partitions"] != float64(want[i]) {
					return false
				}
			}
			return true
		}
	}
	testenv.Eventually(t, 20*time.Second, shares(2, 2, 2), "each replica reports 2 of 6 partitions on /readyz")

	r := requireCLI(t, "status", "--database-url", b.db.DSN)
	for i := range ps {
		require.Regexp(t, regexp.MustCompile(fmt.Sprintf(`(?m)^r%d\s+6\s+2: \d \d\s`, i+1)), r.stdout)
	}
	require.NotRegexp(t, `(?m)^leader\s`, r.stdout, "no single leader to show")
	var st struct {
		Replicas []struct {
			ID   string  `json:"replica_id"`
			Held []int64 `json:"held"`
		} `json:"replicas"`
	}
	require.NoError(t, json.Unmarshal([]byte(requireCLI(t, "status", "--json", "--database-url", b.db.DSN).stdout), &st))
	require.Len(t, st.Replicas, 3)

	require.NoError(t, w.write(t.Context(), 1500, 20))
	testenv.Eventually(t, 30*time.Second, func() bool { return b.db.Count(t, "SUCCESS") >= 500 },
		"the replicas publish")
	for i, base := range bases {
		m := scrape(t, base)
		require.Positive(t, m[mSuccess], "replica %d publishes its share", i+1)
		require.Equal(t, 6.0, m["outbox_partitions_configured"], "replica %d", i+1)
		require.Equal(t, 2.0, m["outbox_partitions_held"], "replica %d", i+1)
	}

	ps[2].Kill()
	require.Equal(t, -1, ps[2].Wait(t, 10*time.Second))
	require.NoError(t, w.write(t.Context(), 500, 20), "write after the kill")
	// Its leases expire after --leader-timeout (2s); the others take them.
	testenv.Eventually(t, 15*time.Second, shares(3, 3), "the two survivors hold 3 partitions each")

	b.waitAllSuccess(t, 2000, 60*time.Second)
	msgs := readStream(t, b.js, b.stream)
	requireEachOnce(t, msgs, b.db.IDs(t, ""))
	requireInOrder(t, msgs, w.next)
}

// A bad --partitions value is a usage error.
func TestPartitionsFlagValidation(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{
		{"--partitions", "-1"},
		{"--partitions", "5000"},
		{"--replica-id", "r1"},
	} {
		r := cli(t, append([]string{"run", "--database-url", "postgres://127.0.0.1:1/x"}, args...)...)
		require.Equal(t, 2, r.code, "%v: %s", args, r.stderr)
		require.Contains(t, r.stderr, "--partitions", "%v", args)
	}
}

// Two live processes under one --replica-id: the second waits a while (the
// holder could be a dead process whose session is ending) and then exits
// 1, naming the session that holds the id, while the first publishes on.
// A process frozen while it holds the id keeps it until its lock session
// times out: then a new process under the same id takes over, and the old
// one, resumed, finds the id taken, publishes nothing and exits 1.
func TestDuplicateReplicaIDRefused(t *testing.T) {
	t.Parallel()
	b := setup(t)
	w := b.seqWriter(b.prefix+".order.updated", entityNames("e", 10), 1)
	flags := []string{"--partitions", "4", "--replica-id", "twin", "--leader-timeout", "1s", "--ack-timeout", "1s"}
	first := startPublisher(t, "first", b.db.DSN, flags...)
	first.WaitLog(t, logJoined, 15*time.Second)

	second := startPublisher(t, "second", b.db.DSN, flags...)
	require.Equal(t, 1, second.Wait(t, 30*time.Second), "a second live process under the same replica id exits 1")
	require.Contains(t, second.Logs(), `replica id in use by another live publisher`)
	require.Regexp(t, `replica id "twin" is held by backend pid \d+ .*--replica-id`, second.Logs())
	require.NotContains(t, second.Logs(), logJoined)
	require.NoError(t, w.write(t.Context(), 200, 20))
	b.waitAllSuccess(t, 200, 30*time.Second)

	// Frozen: its lock session ends after --leader-timeout idle, and the id
	// with it.
	require.NoError(t, syscall.Kill(first.cmd.Process.Pid, syscall.SIGSTOP))
	third := startPublisher(t, "third", b.db.DSN, flags...)
	third.WaitLog(t, logJoined, 20*time.Second)
	require.NoError(t, w.write(t.Context(), 200, 20))
	b.waitAllSuccess(t, 400, 30*time.Second)

	logged := len(first.Logs())
	require.NoError(t, syscall.Kill(first.cmd.Process.Pid, syscall.SIGCONT))
	require.Equal(t, 1, first.Wait(t, 30*time.Second), "the resumed process finds its id taken and exits 1")
	since := first.Logs()[logged:]
	require.Contains(t, since, `replica id in use by another live publisher`)
	require.NotContains(t, since, logJoined)
	require.NoError(t, w.write(t.Context(), 200, 20))
	b.waitAllSuccess(t, 600, 30*time.Second)
	require.Contains(t, third.Logs(), logJoined)
	require.False(t, third.Exited())
	msgs := readStream(t, b.js, b.stream)
	requireEachOnce(t, msgs, b.db.IDs(t, ""))
	requireInOrder(t, msgs, w.next)
}
