//go:build faults

package integration

import (
	"fmt"
	"math/rand/v2"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lib/pq"

	"github.com/pgnats/outbox/internal/testenv"
)

// The partition-lease scenarios (13a–e): several publishers run at once
// with --partitions, each leasing a share of the entities, while replicas
// die, freeze, join and leave, lose every database session, or find a
// lease of theirs taken from under them.

// faultPartitions is the partition count of the lease scenarios: it splits
// evenly over 1, 2 and 3 replicas.
const faultPartitions = 12

const mPartitionsHeld = `outbox_partitions_held`

// Log messages of a partitioned publisher.
const (
	logLeaseLost = `msg="a partition lease or the lock session was lost; rebalancing"`
	logLockLost  = `msg="leadership lost; standing by"`
)

// joinedPID finds the lock session's backend pid in the log line of a join.
var joinedPID = regexp.MustCompile(`msg="joined as a partitioned publisher" .*\bpid=(\d+)`)

// rebalancedHeld finds what a partitioned publisher holds after a round
// that changed it.
var rebalancedHeld = regexp.MustCompile(`msg="partitions rebalanced" held="\[([0-9 ]*)\]"`)

// partitionOfSQL is the partition of an events row's entity, as the
// publishers of the lease scenarios compute it.
var partitionOfSQL = fmt.Sprintf(`(((hashtextextended(entity_type || '/' || entity_id, 0) %% %[1]d) + %[1]d) %% %[1]d)`, faultPartitions)

// claimPartsSQL counts the partition locks (advisory, bigint keys tagged
// 0x6f62 in bits 16-31) that the claim transactions counted by claimTxSQL
// hold shared: one per partition the claim may read.
const claimPartsSQL = `SELECT count(*) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid
	WHERE a.application_name = $1 AND a.state = 'idle in transaction'
	  AND l.locktype = 'advisory' AND l.mode = 'ShareLock' AND l.granted
	  AND l.objsubid = 1 AND (l.objid::bigint >> 16) = x'6f62'::int`

// leaseReplicas are the partitioned publishers of a lease scenario, each
// started by startReplica with metrics and its own application_name.
type leaseReplicas struct {
	t       *testing.T
	b       *bundle
	started int
	flags   []string // added to every replica's flags
	all     []*process
	live    []*process // started and not yet killed or stopped by the test
	id, app map[*process]string
}

func newLeaseReplicas(t *testing.T, b *bundle) *leaseReplicas {
	return &leaseReplicas{t: t, b: b, id: map[*process]string{}, app: map[*process]string{}}
}

// threeSettledReplicas starts three partitioned replicas with new ids (and
// flags added to each) and waits until they hold 4 partitions each.
func threeSettledReplicas(t *testing.T, b *bundle, flags ...string) *leaseReplicas {
	t.Helper()
	rs := newLeaseReplicas(t, b)
	rs.flags = flags
	for range 3 {
		rs.start("")
	}
	if _, ok := rs.settled(20*time.Second, time.Now()); !ok {
		t.Fatalf("3 replicas never held 4 partitions each: %v", rs.held(nil))
	}
	return rs
}

// start starts a publisher with --partitions faultPartitions under replica
// id, or "r<n>" (the n-th started) when id is empty.
func (rs *leaseReplicas) start(id string) *process {
	rs.t.Helper()
	rs.started++
	if id == "" {
		id = fmt.Sprintf("r%d", rs.started)
	}
	p, app := startReplica(rs.t, rs.b, fmt.Sprintf("replica %d (%s)", rs.started, id),
		append([]string{"--partitions", strconv.Itoa(faultPartitions), "--replica-id", id}, rs.flags...)...)
	rs.all = append(rs.all, p)
	rs.live = append(rs.live, p)
	rs.id[p], rs.app[p] = id, app
	return p
}

// drop forgets p once the test has killed or stopped it.
func (rs *leaseReplicas) drop(p *process) {
	rs.live = slices.DeleteFunc(rs.live, func(q *process) bool { return q == p })
}

// lockLosses counts the lock sessions that replicas other than skip logged
// losing: none is expected of a replica the test did not freeze.
func (rs *leaseReplicas) lockLosses(skip *process) int {
	n := 0
	for _, p := range rs.all {
		if p != skip {
			n += strings.Count(p.Logs(), logLockLost)
		}
	}
	return n
}

// lockPID returns the backend pid of p's lock session, as p logged it when
// it last joined, or 0.
func (rs *leaseReplicas) lockPID(p *process) int {
	m := joinedPID.FindAllStringSubmatch(p.Logs(), -1)
	if len(m) == 0 {
		return 0
	}
	pid, _ := strconv.Atoi(m[len(m)-1][1])
	return pid
}

// held scrapes outbox_partitions_held of every live replica but skip (a
// frozen one would not answer).
func (rs *leaseReplicas) held(skip *process) []int {
	rs.t.Helper()
	var out []int
	for _, p := range rs.live {
		if p != skip {
			out = append(out, int(scrape(rs.t, httpBase(rs.t, p))[mPartitionsHeld]))
		}
	}
	return out
}

// allHeld reports whether the live replicas but skip hold faultPartitions
// partitions between them, as their gauges say.
func (rs *leaseReplicas) allHeld(skip *process) bool {
	sum := 0
	for _, n := range rs.held(skip) {
		sum += n
	}
	return sum == faultPartitions
}

// balanced reports whether every live replica holds an even share.
func (rs *leaseReplicas) balanced() bool {
	h := rs.held(nil)
	for _, n := range h {
		if n != faultPartitions/len(h) {
			return false
		}
	}
	return len(h) > 0
}

// settled waits up to timeout for balanced and returns how long it took.
func (rs *leaseReplicas) settled(timeout time.Duration, since time.Time) (time.Duration, bool) {
	ok := waitFor(timeout, rs.balanced)
	return time.Since(since).Round(10 * time.Millisecond), ok
}

// faultPartitionsKill: three partitioned replicas, one SIGKILLed at random
// 10 times and replaced after a short random pause.
func faultPartitionsKill(t *testing.T) faultRow {
	b := setup(t)
	l := newFaultLedger()
	c := startFaultConsumer(t, b, testenv.NATSURL(), b.stream, 0)
	fw := startFaultWriters(t, b, l, steadyLoad)
	rs := threeSettledReplicas(t, b)
	rng := rand.New(rand.NewPCG(3, uint64(time.Now().UnixNano())))
	var killed []string
	var lastKill time.Time
	for i := range 10 {
		pause(time.Duration(500+rng.IntN(2000)) * time.Millisecond)
		victim := rs.live[rng.IntN(len(rs.live))]
		victim.Kill()
		victim.Wait(t, 10*time.Second)
		lastKill = time.Now()
		rs.drop(victim)
		killed = append(killed, rs.id[victim])
		pause(time.Duration(100+rng.IntN(900)) * time.Millisecond)
		// Every other replacement is the same replica restarted (as a
		// service manager would, same --replica-id), its leases still
		// live; the others are new replicas.
		if i%2 == 0 {
			rs.start(rs.id[victim])
		} else {
			rs.start("")
		}
	}
	allHeld := waitFor(30*time.Second, func() bool { return rs.allHeld(nil) })
	heldIn := time.Since(lastKill).Round(10 * time.Millisecond)
	balancedIn, balanced := rs.settled(20*time.Second, lastKill)
	pause(2 * time.Second)
	fw.stop()
	r := settle(t, b, l, b.js, b.stream, c, nil, nil)
	r.note("killed %s, each replaced 0.1–1 s later, kills 1, 3, 5, 7, 9 by a restart under the same replica id, the others by a new id",
		strings.Join(killed, ","))
	r.note("after the last SIGKILL the live replicas held all %d partitions again (sum of %s): %v after %s, 4/4/4: %v after %s",
		faultPartitions, mPartitionsHeld, allHeld, heldIn, balanced, balancedIn)
	r.note("lock sessions lost by replicas not killed: %d", rs.lockLosses(nil))
	if !allHeld || !balanced {
		r.failed = true
	}
	return r
}

// faultPartitionsStop: three partitioned replicas; one is SIGSTOPped while
// it holds a claim transaction, and SIGCONTed 10 s later.
func faultPartitionsStop(t *testing.T) faultRow {
	b := setup(t)
	l := newFaultLedger()
	c := startFaultConsumer(t, b, testenv.NATSURL(), b.stream, 0)
	fw := startFaultWriters(t, b, l, steadyLoad)
	rs := threeSettledReplicas(t, b)
	pause(3 * time.Second)
	victim := rs.live[rand.IntN(len(rs.live))]
	id, app, base := rs.id[victim], rs.app[victim], httpBase(t, victim)
	// Frozen mid-batch, its claim transaction holds its partitions'
	// locks shared (and its rows): the others may take its leases once
	// they expire, but claim from them only once that transaction dies.
	m0, midBatch := stopMidBatch(t, b, victim, app, base)
	stopped := time.Now()
	txEnded := claimTxEnd(b, app, stopped)
	var frozenTx, frozenLocks int
	_ = b.db.Get(&frozenTx, claimTxSQL, app)
	_ = b.db.Get(&frozenLocks, claimPartsSQL, app)
	var leased []int
	_ = b.db.Select(&leased, `SELECT part FROM events_leases WHERE owner = $1 ORDER BY part`, id)
	expired := waitFor(15*time.Second, func() bool {
		var n int
		return b.db.Get(&n, `SELECT count(*) FROM events_leases WHERE owner = $1 AND expires_at > now()`, id) == nil && n == 0
	})
	expiredIn := time.Since(stopped).Round(10 * time.Millisecond)
	takenOver := waitFor(20*time.Second, func() bool { return rs.allHeld(victim) })
	takenIn := time.Since(stopped).Round(10 * time.Millisecond)
	pause(time.Until(stopped.Add(10 * time.Second)))
	logged := len(victim.Logs())
	_ = syscall.Kill(victim.cmd.Process.Pid, syscall.SIGCONT)
	resumed := time.Now()
	since := func() string { return victim.Logs()[logged:] }
	fenced := waitFor(20*time.Second, func() bool {
		s := since()
		return strings.Contains(s, logLeaseLost) || strings.Contains(s, logLockLost)
	})
	fencedIn := time.Since(resumed).Round(10 * time.Millisecond)
	// Scraped as soon as it logged the loss: it holds no lease yet (the
	// others release its share at their next round at the earliest), so
	// marks counted here are marks of its old leases.
	m1 := scrape(t, base)
	rejoined := waitFor(20*time.Second, func() bool { return strings.Contains(since(), logJoined) })
	rebalancedIn, rebalanced := rs.settled(20*time.Second, resumed)
	pause(2 * time.Second)
	fw.stop()
	r := settle(t, b, l, b.js, b.stream, c, nil, nil)
	staleMarks := m1[mSuccess] - m0[mSuccess]
	staleAcks := m1[mAcks] - m0[mAcks]
	txEnd := <-txEnded
	r.note("%s stopped mid-batch: %v, leasing %v; claim transactions open: %d, holding %d partition locks shared, ended %s after SIGSTOP",
		id, midBatch, leased, frozenTx, frozenLocks, txEnd)
	r.note("its leases expired or taken %v at %s, the other two held all %d partitions %v at %s after SIGSTOP",
		expired, expiredIn, faultPartitions, takenOver, takenIn)
	r.note("%s had marked %v before SIGSTOP; %s after SIGCONT it logged: lease lost %d, leadership lost %d, backing off %d; marked %v and got %v PubAcks by then; rejoined %v, 4/4/4 again %v %s after SIGCONT",
		id, m0[mSuccess], fencedIn, strings.Count(since(), logLeaseLost), strings.Count(since(), logLockLost),
		strings.Count(since(), "publish loop backing off"), staleMarks, staleAcks, rejoined, rebalanced, rebalancedIn)
	r.note("lock sessions lost by the other replicas: %d", rs.lockLosses(victim))
	// The others may claim from its partitions only once its claim
	// transaction is gone (both times are polled, hence the slack).
	early := takenIn < txEnd-500*time.Millisecond
	if early {
		r.note("its partitions were all held by others before its claim transaction ended")
	}
	// As in 9b: marks are bounded, not required to be 0, since m0 is read
	// just before the SIGSTOP lands and up to two batches (--batch-size 50)
	// may commit in between.
	if early || !midBatch || !expired || !takenOver || !fenced || staleMarks > 100 || m0[mSuccess] == 0 || !rejoined || !rebalanced {
		r.failed = true
	}
	return r
}

// faultPartitionsJoinLeave: one partitioned replica, a second and a third
// join, then one is stopped with SIGTERM.
func faultPartitionsJoinLeave(t *testing.T) faultRow {
	b := setup(t)
	l := newFaultLedger()
	c := startFaultConsumer(t, b, testenv.NATSURL(), b.stream, 0)
	fw := startFaultWriters(t, b, l, steadyLoad)
	rs := newLeaseReplicas(t, b)
	rs.start("")
	alone, ok1 := rs.settled(20*time.Second, time.Now())
	pause(3 * time.Second)
	rs.start("")
	two, ok2 := rs.settled(20*time.Second, time.Now())
	pause(3 * time.Second)
	rs.start("")
	three, ok3 := rs.settled(20*time.Second, time.Now())
	pause(3 * time.Second)
	leaving := rs.live[1]
	termAt := time.Now()
	leaving.Term()
	code := leaving.Wait(t, 30*time.Second)
	exitIn := time.Since(termAt).Round(time.Millisecond)
	rs.drop(leaving)
	left, ok4 := rs.settled(20*time.Second, termAt)
	pause(3 * time.Second)
	fw.stop()
	r := settle(t, b, l, b.js, b.stream, c, nil, nil)
	r.note("held 12: %v in %s after r1 started; 6/6: %v in %s after r2 started; 4/4/4: %v in %s after r3 started; r2 SIGTERMed: exit %d in %s, 6/6: %v in %s",
		ok1, alone, ok2, two, ok3, three, code, exitIn, ok4, left)
	r.note("lock sessions lost: %d", rs.lockLosses(nil))
	if !ok1 || !ok2 || !ok3 || !ok4 || code != 0 || !strings.Contains(leaving.Logs(), logStopped) {
		r.failed = true
	}
	return r
}

// faultPartitionsTerminate: three partitioned replicas; in each of six
// rounds every session of one of them (its pool, its LISTEN connection and
// its lock session) is terminated with pg_terminate_backend, a different
// replica each round. It must rejoin, and the shares settle to 4/4/4.
func faultPartitionsTerminate(t *testing.T) faultRow {
	b := setup(t)
	l := newFaultLedger()
	c := startFaultConsumer(t, b, testenv.NATSURL(), b.stream, 0)
	fw := startFaultWriters(t, b, l, steadyLoad)
	rs := threeSettledReplicas(t, b)
	const rounds = 6
	var notes []string
	allOK := true
	for i := range rounds {
		pause(1500 * time.Millisecond)
		victim := rs.live[i%len(rs.live)]
		joins, oldPID := strings.Count(victim.Logs(), logJoined), rs.lockPID(victim)
		at := time.Now()
		pool, lock, err := terminateSessions(b, rs.app[victim], oldPID)
		if err != nil {
			t.Errorf("terminate: %v", err)
		}
		rejoined := waitFor(15*time.Second, func() bool { return strings.Count(victim.Logs(), logJoined) > joins })
		rejoinedIn := time.Since(at).Round(10 * time.Millisecond)
		// Balanced only counts once it has rejoined: until its heartbeat
		// sees the lock session gone, its gauge still reads 4.
		balancedIn, balanced := rs.settled(15*time.Second, at)
		notes = append(notes, fmt.Sprintf("%s %d+%d sessions, rejoined %v %s, 4/4/4 %v %s",
			rs.id[victim], pool, lock, rejoined, rejoinedIn, balanced, balancedIn))
		// The pool holds at least one session under the steady load, and
		// the LISTEN connection one more.
		if err != nil || pool < 2 || lock != 1 || !rejoined || !balanced || rs.lockPID(victim) == oldPID {
			allOK = false
		}
	}
	pause(2 * time.Second)
	fw.stop()
	r := settle(t, b, l, b.js, b.stream, c, nil, nil)
	r.note("%d rounds, each terminating pool+LISTEN and lock sessions of one replica, then the delay from pg_terminate_backend: %s",
		rounds, strings.Join(notes, ", "))
	var logs []string
	for _, p := range rs.all {
		s := p.Logs()
		logs = append(logs, fmt.Sprintf("%s joined %d, leadership lost %d, lease lost %d, backing off %d",
			rs.id[p], strings.Count(s, logJoined), strings.Count(s, logLockLost), strings.Count(s, logLeaseLost),
			strings.Count(s, "publish loop backing off")))
	}
	r.note("logged: %s", strings.Join(logs, "; "))
	if !allOK {
		r.failed = true
	}
	return r
}

// faultLeaseIntruder: three partitioned replicas; the test gives one
// partition of the first replica's share to another owner for 5 s (a lease
// row it did not write, unexpired), then deletes that row. The replica must
// drop the partition, leave its events READY while the others flow, then
// take it again and drain it.
func faultLeaseIntruder(t *testing.T) faultRow {
	b := setup(t)
	l := newFaultLedger()
	c := startFaultConsumer(t, b, testenv.NATSURL(), b.stream, 0)
	fw := startFaultWriters(t, b, l, steadyLoad)
	rs := threeSettledReplicas(t, b)
	pause(2 * time.Second)
	first := rs.all[0]
	id, base := rs.id[first], httpBase(t, first)
	var leased []int
	if err := b.db.Select(&leased, `SELECT part FROM events_leases WHERE owner = $1 ORDER BY part`, id); err != nil {
		t.Fatalf("leases: %v", err)
	}
	// Of its partitions, the one with the most entities written so far.
	var part, entities int
	if err := b.db.QueryRow(`SELECT `+partitionOfSQL+`, count(DISTINCT entity_id) FROM events
		WHERE `+partitionOfSQL+` = ANY($1) GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1`, pq.Array(leased)).Scan(&part, &entities); err != nil {
		t.Fatalf("pick a partition of %v: %v", leased, err)
	}
	// READY and SUCCESS rows of the partition, SUCCESS rows of the others.
	counts := func() (ready, success, others int) {
		_ = b.db.QueryRow(`SELECT count(*) FILTER (WHERE event_status = 'READY' AND p = $1),
			count(*) FILTER (WHERE event_status = 'SUCCESS' AND p = $1),
			count(*) FILTER (WHERE event_status = 'SUCCESS' AND p <> $1)
			FROM (SELECT event_status, `+partitionOfSQL+` AS p FROM events) e`, part).Scan(&ready, &success, &others)
		return ready, success, others
	}
	logged := len(first.Logs())
	if _, err := b.db.Exec(`UPDATE events_leases SET owner = 'intruder', expires_at = now() + interval '1 hour' WHERE part = $1`, part); err != nil {
		t.Fatalf("take the lease: %v", err)
	}
	taken := time.Now()
	dropped := waitFor(10*time.Second, func() bool { return scrape(t, base)[mPartitionsHeld] == faultPartitions/3-1 })
	droppedIn := time.Since(taken).Round(10 * time.Millisecond)
	ready0, success0, others0 := counts()
	pause(time.Until(taken.Add(5 * time.Second)))
	ready1, success1, others1 := counts()
	var owner string
	_ = b.db.Get(&owner, `SELECT owner FROM events_leases WHERE part = $1`, part)
	var lastSeq int64
	_ = b.db.Get(&lastSeq, `SELECT coalesce(max(seq), 0) FROM events`)
	if _, err := b.db.Exec(`DELETE FROM events_leases WHERE part = $1`, part); err != nil {
		t.Fatalf("delete the lease: %v", err)
	}
	deleted := time.Now()
	retaken := waitFor(10*time.Second, func() bool { return scrape(t, base)[mPartitionsHeld] == faultPartitions/3 })
	retakenIn := time.Since(deleted).Round(10 * time.Millisecond)
	// Everything of the partition written before the delete is published.
	drained := waitFor(20*time.Second, func() bool {
		var n int
		return b.db.Get(&n, `SELECT count(*) FROM events WHERE event_status = 'READY' AND seq <= $2 AND `+partitionOfSQL+` = $1`,
			part, lastSeq) == nil && n == 0
	})
	drainedIn := time.Since(deleted).Round(10 * time.Millisecond)
	var newOwner string
	_ = b.db.Get(&newOwner, `SELECT owner FROM events_leases WHERE part = $1`, part)
	balanced := rs.balanced()
	since := first.Logs()[logged:]
	// Its first change of holdings after the takeover, if it logged one.
	without := false
	if m := rebalancedHeld.FindStringSubmatch(since); m != nil {
		without = !slices.Contains(strings.Fields(m[1]), strconv.Itoa(part))
	}
	pause(2 * time.Second)
	fw.stop()
	r := settle(t, b, l, b.js, b.stream, c, nil, nil)
	r.note("%s's partition %d (of %v, %d entities) given to another owner for 5 s: %s=%d %v after %s, next rebalance logged without it %v; its owner then %q",
		id, part, leased, entities, mPartitionsHeld, faultPartitions/3-1, dropped, droppedIn, without, owner)
	r.note("from the drop to the delete: READY of the partition %d→%d, SUCCESS of it %d→%d, SUCCESS of the others %d→%d",
		ready0, ready1, success0, success1, others0, others1)
	r.note("after the delete: %s held %d again %v after %s (owner %q), the partition's backlog drained %v after %s; 4/4/4 %v",
		id, faultPartitions/3, retaken, retakenIn, newOwner, drained, drainedIn, balanced)
	r.note("%s logged: lease lost %d, leadership lost %d", id, strings.Count(since, logLeaseLost), strings.Count(since, logLockLost))
	if !(dropped || without) || success1 != success0 || ready1 == 0 || others1 <= others0 || owner != "intruder" ||
		!retaken || !drained || newOwner != id || !balanced {
		r.failed = true
	}
	return r
}

// The transactions a partitioned replica opens, as pg_stat_activity shows
// them while it is frozen: $1 is the application_name of its pool, or for
// a renewal the backend pid of its lock session.
var frozenInSQL = map[string]string{
	// A claim transaction, open until its batch is marked.
	"claim": claimTxSQL,
	// A lease round: it holds the round's lock (obx5) exclusively.
	"lease round": `SELECT count(*) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid
		WHERE a.application_name = $1 AND a.state = 'idle in transaction'
		  AND l.locktype = 'advisory' AND l.granted AND l.mode = 'ExclusiveLock'
		  AND l.classid = x'6f627835'::int::oid AND l.objsubid = 2`,
	// A renewal of its leases (one statement on the lock session, run by
	// the heartbeat), running or ended within 60 ms of the check.
	"renewal": `SELECT count(*) FROM pg_stat_activity a
		WHERE a.pid = $1 AND a.query LIKE 'WITH seen AS%'
		  AND (a.state = 'active' OR a.state_change > clock_timestamp() - interval '60 milliseconds')`,
}

// stopInside SIGSTOPs p at random moments until the stop lands while the
// query of kind (frozenInSQL) finds p inside that kind of transaction, and
// reports whether one did and after how many tries.
func (rs *leaseReplicas) stopInside(p *process, kind string) (bool, int) {
	pid := p.cmd.Process.Pid
	for i := range 3000 {
		_ = syscall.Kill(pid, syscall.SIGSTOP)
		time.Sleep(20 * time.Millisecond)
		var n int
		var arg any = rs.app[p]
		if kind == "renewal" {
			arg = rs.lockPID(p)
		}
		_ = rs.b.db.Get(&n, frozenInSQL[kind], arg)
		if n > 0 {
			return true, i + 1
		}
		_ = syscall.Kill(pid, syscall.SIGCONT)
		time.Sleep(time.Duration(rand.IntN(30)) * time.Millisecond)
	}
	return false, 3000
}

// frozenLeaderTimeout and frozenAckTimeout are the flags of 13f: the claim
// transaction of a frozen replica ends after 2 × 1 s + 5 s = 7 s idle,
// within the 2 × --leader-timeout = 12 s its partitions must move within.
const (
	frozenLeaderTimeout = 6 * time.Second
	frozenAckTimeout    = time.Second
)

// faultPartitionsFrozenInside: three partitioned replicas; for each kind of
// transaction a replica opens (claim, lease round, renewal), one replica
// is SIGSTOPped at random moments until a stop lands inside one. The
// others must keep publishing their own partitions, and take over the
// frozen replica's partitions and publish from them, within 2 ×
// --leader-timeout; then it is SIGCONTed and must rejoin.
func faultPartitionsFrozenInside(t *testing.T) faultRow {
	b := setup(t)
	l := newFaultLedger()
	c := startFaultConsumer(t, b, testenv.NATSURL(), b.stream, 0)
	fw := startFaultWriters(t, b, l, steadyLoad)
	rs := threeSettledReplicas(t, b, "--leader-timeout", frozenLeaderTimeout.String(), "--ack-timeout", frozenAckTimeout.String())
	limit := 2 * frozenLeaderTimeout
	successIn := func(parts []int, in bool) int {
		var n int
		_ = b.db.Get(&n, `SELECT count(*) FROM events WHERE event_status = 'SUCCESS'
			AND (`+partitionOfSQL+` = ANY($1)) = $2`, pq.Array(parts), in)
		return n
	}
	failed := false
	var notes []string
	frozen := map[*process]bool{}
	for _, kind := range []string{"claim", "lease round", "renewal"} {
		pause(2 * time.Second)
		victim := rs.live[rand.IntN(len(rs.live))]
		id := rs.id[victim]
		frozen[victim] = true
		landed, tries := rs.stopInside(victim, kind)
		stopped := time.Now()
		var leased []int
		_ = b.db.Select(&leased, `SELECT part FROM events_leases WHERE owner = $1 ORDER BY part`, id)
		others0, frozen0 := successIn(leased, false), successIn(leased, true)
		// The others' publishing, sampled until the frozen partitions
		// moved: its longest pause.
		var longest time.Duration
		last, lastAt := others0, stopped
		var takenIn, movedIn time.Duration
		waitFor(30*time.Second, func() bool {
			now := time.Now()
			if n := successIn(leased, false); n > last {
				longest, last, lastAt = max(longest, now.Sub(lastAt)), n, now
			}
			if takenIn == 0 && rs.allHeld(victim) {
				takenIn = now.Sub(stopped)
			}
			if movedIn == 0 && successIn(leased, true) > frozen0 {
				movedIn = now.Sub(stopped)
			}
			return takenIn > 0 && movedIn > 0
		})
		longest = max(longest, time.Since(lastAt))
		_ = syscall.Kill(victim.cmd.Process.Pid, syscall.SIGCONT)
		resumed := time.Now()
		rebalancedIn, rebalanced := rs.settled(30*time.Second, resumed)
		ok := landed && takenIn > 0 && takenIn <= limit && movedIn > 0 && movedIn <= limit && longest <= limit && rebalanced
		notes = append(notes, fmt.Sprintf("%s: %s stopped inside one %v after %d tries, leasing %v; its partitions all held by the others %s and publishing %s after SIGSTOP (limit %s); the others' publishing paused at most %s; 4/4/4 again %v %s after SIGCONT",
			kind, id, landed, tries, leased, round(takenIn), round(movedIn), limit, round(longest), rebalanced, rebalancedIn))
		if !ok {
			failed = true
		}
	}
	pause(2 * time.Second)
	fw.stop()
	r := settle(t, b, l, b.js, b.stream, c, nil, nil)
	r.note("--leader-timeout %s --ack-timeout %s", frozenLeaderTimeout, frozenAckTimeout)
	for _, n := range notes {
		r.note("%s", n)
	}
	losses := 0
	for _, p := range rs.all {
		if !frozen[p] {
			losses += strings.Count(p.Logs(), logLockLost)
		}
	}
	r.note("lock sessions lost by replicas never frozen: %d", losses)
	r.failed = r.failed || failed
	return r
}

// round shows a measured delay, or "never" for one that did not happen.
func round(d time.Duration) string {
	if d == 0 {
		return "never"
	}
	return d.Round(10 * time.Millisecond).String()
}
