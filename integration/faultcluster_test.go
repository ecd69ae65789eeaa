//go:build faults

package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lib/pq"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgnats/outbox/internal/testenv"
)

// The clustered JetStream scenarios (15a–f): three in-process nats-server
// nodes form a JetStream cluster on loopback, every route between two
// nodes running through a TCP proxy of the test (faultProxy), one per
// direction; the stream has 3 replicas on file storage; the publisher and
// the consumer are given every node's URL.

// natsCluster is a JetStream cluster of in-process nodes.
type natsCluster struct {
	t     *testing.T
	nodes []*testenv.NATSServer
	names []string
	// route[i][j] carries the routes node i dials to node j.
	route [][]*faultProxy
	nc    *nats.Conn // the test's own connection, to every node
	js    jetstream.JetStream
}

// account is the account streams live in when the server has no accounts
// configured.
const account = server.DEFAULT_GLOBAL_ACCOUNT

// startNATSCluster starts n nodes and waits until JetStream answers.
//
// Each node dials every other through the proxy for that pair, and
// advertises a route address that refuses connections: a node that learns
// of another through a third (gossip) then cannot reach it around the
// proxies, so black-holing a node's proxies cuts it off entirely.
func startNATSCluster(t *testing.T, n int) *natsCluster {
	t.Helper()
	c := &natsCluster{t: t, route: make([][]*faultProxy, n)}
	for i := range n {
		c.route[i] = make([]*faultProxy, n)
		for j := range n {
			if i != j {
				c.route[i][j] = newFaultProxy(t, "")
			}
		}
	}
	nowhere := newFaultProxy(t, "") // accepts and closes: the advertised route address
	for i := range n {
		name := fmt.Sprintf("n%d", i+1)
		var routes []*url.URL
		for j := range n {
			if i != j {
				routes = append(routes, &url.URL{Scheme: "nats-route", Host: c.route[i][j].addr()})
			}
		}
		c.names = append(c.names, name)
		c.nodes = append(c.nodes, testenv.StartNATSServer(t, &server.Options{
			ServerName: name, JetStream: true, StoreDir: t.TempDir(),
			Cluster: server.ClusterOpts{Name: "outbox", Host: "127.0.0.1", Port: -1, Advertise: nowhere.addr()},
			Routes:  routes,
		}))
	}
	for i := range n {
		for j := range n {
			if i != j {
				c.route[i][j].setTarget(c.nodes[j].ClusterAddr())
			}
		}
	}
	var err error
	c.nc, err = nats.Connect(c.urls(), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond), nats.ReconnectBufSize(-1))
	if err != nil {
		t.Fatalf("connect to the cluster: %v", err)
	}
	t.Cleanup(c.nc.Close)
	if c.js, err = jetstream.New(c.nc); err != nil {
		t.Fatal(err)
	}
	if !waitFor(30*time.Second, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, err := c.js.AccountInfo(ctx)
		return err == nil
	}) {
		t.Fatalf("the JetStream cluster never answered")
	}
	return c
}

// urls is every node's client URL, comma-separated.
func (c *natsCluster) urls() string {
	var us []string
	for _, n := range c.nodes {
		us = append(us, n.URL())
	}
	return strings.Join(us, ",")
}

// bundle creates a file-backed stream with 3 replicas (2 minute duplicate
// window) on a fresh prefix, waits until every replica is current, and
// returns a bundle for it with its own schema.
func (c *natsCluster) bundle() *bundle {
	t := c.t
	t.Helper()
	prefix := "t" + testenv.Suffix()
	name := "C_" + strings.ToUpper(prefix)
	// Until every node has joined the meta group, placing 3 replicas fails
	// (10005, no suitable peers).
	var err error
	waitFor(20*time.Second, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err = c.js.CreateStream(ctx, jetstream.StreamConfig{Name: name, Subjects: []string{prefix + ".>"},
			Storage: jetstream.FileStorage, Replicas: 3, Duplicates: 2 * time.Minute})
		return err == nil
	})
	if err != nil {
		t.Fatalf("create stream: %v", err)
	}
	if !c.replicasCurrent(name, 20*time.Second) {
		t.Fatalf("stream %s: replicas never current", name)
	}
	return newBundle(t, c.js, name, prefix)
}

// leader returns the index of the node leading stream, or -1. A node cut
// off may still believe it leads for a moment: see leaderBesides.
func (c *natsCluster) leader(stream string) int { return c.leaderBesides(stream, -1) }

// leaderBesides returns the index of a node other than skip that leads
// stream, or -1.
func (c *natsCluster) leaderBesides(stream string, skip int) int {
	for i, n := range c.nodes {
		if i == skip {
			continue
		}
		if s := n.Server(); s != nil && s.JetStreamIsStreamLeader(account, stream) {
			return i
		}
	}
	return -1
}

// metaLeader returns the index of the node leading the JetStream meta
// group (which answers the API: stream lists, stream info), or -1.
func (c *natsCluster) metaLeader() int {
	for i, n := range c.nodes {
		if s := n.Server(); s != nil && s.JetStreamIsLeader() {
			return i
		}
	}
	return -1
}

// replicasCurrent waits until the stream has a leader and every running
// node's replica is current.
func (c *natsCluster) replicasCurrent(stream string, timeout time.Duration) bool {
	return waitFor(timeout, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		s, err := c.js.Stream(ctx, stream)
		if err != nil {
			return false
		}
		cl := s.CachedInfo().Cluster
		if cl == nil || cl.Leader == "" || len(cl.Replicas) != len(c.nodes)-1 {
			return false
		}
		for _, r := range cl.Replicas {
			if !r.Current || r.Offline {
				return false
			}
		}
		return true
	})
}

// stepDown asks the stream's leader to step down, to the node named
// preferred if not empty, and waits until another node leads. It returns
// how long that took.
func (c *natsCluster) stepDown(stream, preferred string) (time.Duration, error) {
	old := c.leader(stream)
	var body []byte
	if preferred != "" {
		body, _ = json.Marshal(map[string]any{"placement": map[string]string{"preferred": preferred}})
	}
	began := time.Now()
	msg, err := c.nc.Request("$JS.API.STREAM.LEADER.STEPDOWN."+stream, body, 5*time.Second)
	if err != nil {
		return 0, fmt.Errorf("step down %s: %w", stream, err)
	}
	var resp struct {
		Success bool `json:"success"`
		Error   *struct {
			Description string `json:"description"`
		} `json:"error"`
	}
	if err := json.Unmarshal(msg.Data, &resp); err != nil {
		return 0, fmt.Errorf("step down %s: %w", stream, err)
	}
	if !resp.Success {
		desc := "no success"
		if resp.Error != nil {
			desc = resp.Error.Description
		}
		return 0, fmt.Errorf("step down %s: %s", stream, desc)
	}
	if !waitFor(20*time.Second, func() bool { return c.leaderBesides(stream, old) >= 0 }) {
		return 0, fmt.Errorf("step down %s: no new leader within 20s", stream)
	}
	return time.Since(began), nil
}

// clientNode returns the index of the node a client connection named name
// is connected to, or -1.
func (c *natsCluster) clientNode(name string) int {
	for i, n := range c.nodes {
		s := n.Server()
		if s == nil {
			continue
		}
		cz, err := s.Connz(&server.ConnzOptions{})
		if err != nil {
			continue
		}
		for _, ci := range cz.Conns {
			if ci.Name == name {
				return i
			}
		}
	}
	return -1
}

// isolate black-holes every route between node i and the others, both
// directions.
func (c *natsCluster) isolate(i int) {
	for j := range c.nodes {
		if j != i {
			c.route[i][j].blackhole()
			c.route[j][i].blackhole()
		}
	}
}

// heal lets node i's routes through again, with what they held.
func (c *natsCluster) heal(i int) {
	for j := range c.nodes {
		if j != i {
			c.route[i][j].restore()
			c.route[j][i].restore()
		}
	}
}

// crash stops node i as a killed process would look to the others: its
// routes are black-holed first, so that what a shutdown sends them (the
// leadership it hands over) never arrives, then it shuts down (its clients
// see their connections close), then its routes are severed (the peers see
// theirs close) and opened again for the restart. What differs from a
// SIGKILL is the store: a shutdown writes it out cleanly.
func (c *natsCluster) crash(i int) {
	c.isolate(i)
	c.nodes[i].Stop()
	for j := range c.nodes {
		if j != i {
			c.route[i][j].sever()
			c.route[j][i].sever()
		}
	}
	c.heal(i)
}

// other returns the index of a node that is neither a nor b.
func (c *natsCluster) other(a, b int) int {
	for i := range c.nodes {
		if i != a && i != b {
			return i
		}
	}
	return -1
}

// publisherName is the name the publisher gives its NATS connection.
const publisherName = "pgnats-outbox publisher"

// reconnectedTo finds the URLs the publisher logged reconnecting to.
var reconnectedTo = regexp.MustCompile(`msg="NATS reconnected" url=(\S+)`)

// logOrderBroken is what the publisher logs when it sees an entity's order
// broken (docs/ARCHITECTURE.md "Ordering, precisely").
const logOrderBroken = "the entity's order is broken"

// clusterRun is a cluster scenario under way: a cluster, a stream with 3
// replicas, the ledger, the consumer, the writers and the publisher.
type clusterRun struct {
	c  *natsCluster
	b  *bundle
	l  *faultLedger
	fc *faultConsumer
	fw *faultWriters
	p  *process
}

// startClusterRun starts a cluster scenario, the publisher given every
// node's URL, its pool named app when not empty, and extra flags, and
// waits until the publisher marked a first batch.
func startClusterRun(t *testing.T, app string, extra ...string) *clusterRun {
	t.Helper()
	c := startNATSCluster(t, 3)
	b := c.bundle()
	r := &clusterRun{c: c, b: b, l: newFaultLedger()}
	r.fc = startFaultConsumer(t, b, c.urls(), b.stream, 0)
	r.fw = startFaultWriters(t, b, r.l, steadyLoad)
	r.p = r.publisher("publisher", app, extra...)
	if !waitFor(20*time.Second, func() bool { return b.db.Count(t, "SUCCESS") > 0 && c.clientNode(publisherName) >= 0 }) {
		t.Fatalf("the publisher never published to the cluster")
	}
	return r
}

// publisher starts a publisher given every node's URL.
func (r *clusterRun) publisher(name, app string, extra ...string) *process {
	r.c.t.Helper()
	dsn := r.b.db.DSN
	if app != "" {
		dsn = withAppName(r.c.t, dsn, app)
	}
	return startFaultPublisher(r.c.t, name, dsn, append([]string{"--nats-url", r.c.urls()}, extra...)...)
}

// finish stops the writers, settles and adds the notes every cluster row
// has: backoffs and order breaks the publisher logged.
func (r *clusterRun) finish(t *testing.T) faultRow {
	t.Helper()
	r.fw.stop()
	row := settle(t, r.b, r.l, r.c.js, r.b.stream, r.fc, nil, nil)
	logs := r.p.Logs()
	row.note("publisher backoffs logged %d, order breaks logged %d, alive %v",
		strings.Count(logs, "publish loop backing off"), strings.Count(logs, logOrderBroken), !r.p.Exited())
	if r.p.Exited() {
		row.failed = true
	}
	return row
}

// stallWatch samples the count of SUCCESS events every 100 ms from its
// start until stop, which returns the longest time the count did not grow.
type stallWatch struct {
	stopCh  chan struct{}
	longest chan time.Duration
}

func (r *clusterRun) watchStalls() *stallWatch {
	w := &stallWatch{stopCh: make(chan struct{}), longest: make(chan time.Duration, 1)}
	go func() {
		var longest time.Duration
		last, grew := -1, time.Now()
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			var n int
			if r.b.db.Get(&n, `SELECT count(*) FROM events WHERE event_status = 'SUCCESS'`) == nil && n != last {
				last, grew = n, time.Now()
			}
			longest = max(longest, time.Since(grew))
			select {
			case <-w.stopCh:
				w.longest <- longest.Round(100 * time.Millisecond)
				return
			case <-tick.C:
			}
		}
	}()
	return w
}

// stop ends the watch and returns the longest stall seen.
func (w *stallWatch) stop() time.Duration {
	close(w.stopCh)
	return <-w.longest
}

// successGrew waits up to timeout for the count of SUCCESS events to pass
// from, and returns how long it took.
func (r *clusterRun) successGrew(t *testing.T, from int, timeout time.Duration) (time.Duration, bool) {
	t.Helper()
	began := time.Now()
	ok := waitFor(timeout, func() bool { return r.b.db.Count(t, "SUCCESS") > from })
	return time.Since(began).Round(10 * time.Millisecond), ok
}

// faultClusterStepDown: the stream's leader steps down 10 times under
// steady writes, 1.5 s apart.
func faultClusterStepDown(t *testing.T) faultRow {
	r := startClusterRun(t, "")
	var took []string
	fails := 0
	w := r.watchStalls()
	for range 10 {
		pause(1500 * time.Millisecond)
		d, err := r.c.stepDown(r.b.stream, "")
		if err != nil {
			t.Logf("%v", err)
			fails++
			continue
		}
		took = append(took, d.Round(10*time.Millisecond).String())
	}
	before := r.b.db.Count(t, "SUCCESS")
	resumed, ok := r.successGrew(t, before, 20*time.Second)
	stall := w.stop()
	pause(2 * time.Second)
	row := r.finish(t)
	row.note("%d step-downs, new leader after %s; longest time without a mark %s; marking after the last %v (%s)",
		len(took), strings.Join(took, ","), stall, ok, resumed)
	if fails > 0 || !ok {
		row.failed = true
	}
	return row
}

// faultClusterLeaderCrash: the node holding the stream's leader crashes
// (crash) under writes and is restarted 5 s later on its store.
func faultClusterLeaderCrash(t *testing.T) faultRow {
	r := startClusterRun(t, "")
	pause(3 * time.Second)
	victim := r.c.leader(r.b.stream)
	if victim < 0 {
		t.Fatal("no stream leader")
	}
	pub, meta := r.c.clientNode(publisherName), r.c.metaLeader()
	before := r.b.db.Count(t, "SUCCESS")
	w := r.watchStalls()
	crashed := time.Now()
	r.c.crash(victim)
	metaBack := waitForIn(30*time.Second, func() bool { return r.c.metaLeader() >= 0 })
	elected := waitFor(30*time.Second, func() bool { return r.c.leader(r.b.stream) >= 0 })
	electedIn := time.Since(crashed).Round(10 * time.Millisecond)
	_, resumed := r.successGrew(t, r.b.db.Count(t, "SUCCESS"), 30*time.Second)
	resumedIn := time.Since(crashed).Round(10 * time.Millisecond)
	row, caughtUp := r.restartAndFinish(t, victim, crashed, w)
	row.note("leader %s crashed (publisher on %s, meta leader on %s) after %d marked; a meta leader %s after the crash, a new stream leader %s (%v), a batch marked again %s after the crash (%v); restarted after 5 s, its replica current again: %v",
		r.c.names[victim], nameOf(r.c, pub), nameOf(r.c, meta), before, metaBack, electedIn, elected, resumedIn, resumed, caughtUp)
	if !elected || !resumed || !caughtUp {
		row.failed = true
	}
	return row
}

// restartAndFinish restarts node victim 5 s after it crashed, waits until
// its replica is current again, lets the writers run 2 s more, and
// finishes the run; the row notes the longest stall w saw. It reports
// whether the replica caught up.
func (r *clusterRun) restartAndFinish(t *testing.T, victim int, crashed time.Time, w *stallWatch) (faultRow, bool) {
	t.Helper()
	pause(time.Until(crashed.Add(5 * time.Second)))
	r.c.nodes[victim].Start()
	caughtUp := r.c.replicasCurrent(r.b.stream, 30*time.Second)
	pause(2 * time.Second)
	stall := w.stop()
	row := r.finish(t)
	row.note("longest time without a mark %s", stall)
	return row, caughtUp
}

// faultClusterClientNode: the node the publisher is connected to crashes;
// the stream's leader is moved elsewhere first, so that what is tested is
// the publisher's reconnection, not an election. The node is restarted
// 5 s later.
func faultClusterClientNode(t *testing.T) faultRow {
	r := startClusterRun(t, "")
	pause(2 * time.Second)
	victim := r.c.clientNode(publisherName)
	if r.c.leader(r.b.stream) == victim {
		if _, err := r.c.stepDown(r.b.stream, r.c.names[r.c.other(victim, victim)]); err != nil {
			t.Fatal(err)
		}
	}
	leader := r.c.leader(r.b.stream)
	pause(2 * time.Second)
	w := r.watchStalls()
	crashed := time.Now()
	r.c.crash(victim)
	moved := waitFor(20*time.Second, func() bool { n := r.c.clientNode(publisherName); return n >= 0 && n != victim })
	movedIn := time.Since(crashed).Round(10 * time.Millisecond)
	_, resumed := r.successGrew(t, r.b.db.Count(t, "SUCCESS"), 20*time.Second)
	resumedIn := time.Since(crashed).Round(10 * time.Millisecond)
	now := r.c.clientNode(publisherName)
	row, caughtUp := r.restartAndFinish(t, victim, crashed, w)
	var to []string
	for _, m := range reconnectedTo.FindAllStringSubmatch(r.p.Logs(), -1) {
		to = append(to, m[1])
	}
	row.note("publisher's node %s crashed (leader on %s); the publisher reconnected to %s in %s (%v; logged %s), marked again %s after the crash (%v); node restarted after 5 s, replica current: %v",
		r.c.names[victim], r.c.names[leader], nameOf(r.c, now), movedIn, moved, strings.Join(to, ","), resumedIn, resumed, caughtUp)
	if !moved || !resumed || !caughtUp {
		row.failed = true
	}
	return row
}

// waitForIn waits like waitFor and says how long it took, or "never".
func waitForIn(timeout time.Duration, cond func() bool) string {
	began := time.Now()
	if !waitFor(timeout, cond) {
		return "never"
	}
	return time.Since(began).Round(10 * time.Millisecond).String()
}

// nameOf is node i's name, or "none" for -1.
func nameOf(c *natsCluster, i int) string {
	if i < 0 {
		return "none"
	}
	return c.names[i]
}

// faultClusterPartition: one node is cut off from the other two for 20 s,
// then healed. withPublisher chooses which: the node the publisher is
// connected to, made the stream's leader first (the publisher and the
// leader are cut off together from the majority), or the stream leader's
// node, the publisher being connected to another (the majority elects a
// new leader and the publisher goes on through it).
func faultClusterPartition(withPublisher bool) func(t *testing.T) faultRow {
	return func(t *testing.T) faultRow {
		r := startClusterRun(t, "")
		pause(2 * time.Second)
		pub := r.c.clientNode(publisherName)
		leader := r.c.leader(r.b.stream)
		switch {
		case withPublisher && leader != pub:
			if _, err := r.c.stepDown(r.b.stream, r.c.names[pub]); err != nil {
				t.Fatal(err)
			}
		case !withPublisher && leader == pub:
			if _, err := r.c.stepDown(r.b.stream, r.c.names[r.c.other(pub, pub)]); err != nil {
				t.Fatal(err)
			}
		}
		victim := r.c.leader(r.b.stream)
		pause(2 * time.Second)
		meta := r.c.metaLeader()
		before := r.b.db.Count(t, "SUCCESS")
		cut := time.Now()
		r.c.isolate(victim)
		type result struct {
			in time.Duration
			ok bool
		}
		election := make(chan result, 1)
		go func() {
			ok := waitFor(20*time.Second, func() bool { return r.c.leaderBesides(r.b.stream, victim) >= 0 })
			election <- result{time.Since(cut).Round(10 * time.Millisecond), ok}
		}()
		w := r.watchStalls()
		e := <-election
		elected, electedIn := e.ok, e.in
		pause(time.Until(cut.Add(20 * time.Second)))
		during := r.b.db.Count(t, "SUCCESS") - before
		stall := w.stop()
		r.c.heal(victim)
		healed := time.Now()
		resumedIn, resumed := r.successGrew(t, r.b.db.Count(t, "SUCCESS"), 30*time.Second)
		caughtUp := r.c.replicasCurrent(r.b.stream, 30*time.Second)
		caughtUpIn := time.Since(healed).Round(10 * time.Millisecond)
		pause(2 * time.Second)
		row := r.finish(t)
		row.note("cut off %s for 20 s (the stream leader; publisher on %s, meta leader on %s): a leader elected on the majority side in %s (%v); %d events marked during the cut, the longest time without a mark %s; after healing a batch marked within %s (%v), every replica current after %s (%v)",
			r.c.names[victim], nameOf(r.c, r.c.clientNode(publisherName)), nameOf(r.c, meta), electedIn, elected, during, stall, resumedIn, resumed, caughtUpIn, caughtUp)
		if !elected || !resumed || !caughtUp || (!withPublisher && during == 0) {
			row.failed = true
		}
		return row
	}
}

// faultClusterDedup: the publisher is SIGSTOPped when it has sent a batch
// that JetStream stored but that it has not marked, SIGKILLed, the stream's
// leader steps down, and a new publisher starts: it claims the same rows
// and sends them again, with the same Nats-Msg-Id, to the new leader, which
// must drop them as duplicates. Three rounds.
func faultClusterDedup(t *testing.T) faultRow {
	app := "faults_" + testenv.Suffix()
	r := startClusterRun(t, app, metricsFlags...)
	pub := r.p
	resent := map[string]bool{}
	rounds := 0
	for round := range 3 {
		pause(2 * time.Second)
		ids, ok := stopSentNotMarked(t, r, pub, app)
		if !ok {
			t.Logf("round %d: never stopped between a batch's send and its mark", round+1)
			continue
		}
		rounds++
		for _, id := range ids {
			resent[id] = true
		}
		pub.Kill()
		pub.Wait(t, 10*time.Second)
		if _, err := r.c.stepDown(r.b.stream, ""); err != nil {
			t.Fatal(err)
		}
		pub = r.publisher(fmt.Sprintf("publisher %d", round+2), app, metricsFlags...)
	}
	r.p = pub
	pause(2 * time.Second)
	row := r.finish(t)
	copies := map[string]int{}
	for _, m := range readStream(t, r.c.js, r.b.stream) {
		if resent[m.eventID] {
			copies[m.eventID]++
		}
	}
	stored := 0
	for id := range resent {
		if copies[id] > 1 {
			row.failed = true
		}
		if copies[id] == 1 {
			stored++
		}
	}
	var marked int
	ids := make([]string, 0, len(resent))
	for id := range resent {
		ids = append(ids, id)
	}
	_ = r.b.db.Get(&marked, `SELECT count(*) FROM events WHERE event_status = 'SUCCESS' AND event_id::text = ANY($1)`, pq.Array(ids))
	row.note("%d rounds; %d events stored but not marked when their publisher was killed, each sent again to a new leader after a step-down: %d marked SUCCESS by the successor, %d stored once, %d stored more than once",
		rounds, len(resent), marked, stored, len(resent)-stored)
	if rounds == 0 || marked != len(resent) || stored != len(resent) {
		row.failed = true
	}
	return row
}

// stopSentNotMarked SIGSTOPs pub (whose pool is named app) until it stops
// with events in the stream whose rows are still READY: sent and stored,
// not marked. It returns their ids, pub left stopped.
func stopSentNotMarked(t *testing.T, r *clusterRun, pub *process, app string) ([]string, bool) {
	t.Helper()
	base := httpBase(t, pub)
	for range 20 {
		if _, mid := stopMidBatch(t, r.b, pub, app, base); !mid {
			continue
		}
		ready := map[string]bool{}
		for _, id := range r.b.db.IDs(t, "READY") {
			ready[id] = true
		}
		var ids []string
		for _, m := range readStream(t, r.c.js, r.b.stream) {
			if ready[m.eventID] {
				ids = append(ids, m.eventID)
			}
		}
		if len(ids) > 0 {
			return ids, true
		}
		_ = syscall.Kill(pub.cmd.Process.Pid, syscall.SIGCONT)
		pause(300 * time.Millisecond)
	}
	return nil, false
}

// TestClusterDrainRate runs `publisher bench` against an in-process
// three-node cluster, with a stream of one replica and of three, three times
// each, alternating, and prints the figures (docs/PERFORMANCE.md "A replicated stream"). It
// measures rather than asserts; run it alone:
//
//	go test -tags faults -count=1 -run TestClusterDrainRate -v ./integration/
func TestClusterDrainRate(t *testing.T) {
	c := startNATSCluster(t, 3)
	type figures struct {
		DBLimit   float64 `json:"db_limit_events_per_sec"`
		NATSLimit float64 `json:"nats_limit_events_per_sec"`
		Drain     float64 `json:"drain_events_per_sec"`
		Latency   struct {
			P50 float64 `json:"p50"`
			P99 float64 `json:"p99"`
		} `json:"latency_ms"`
	}
	var rows []string
	// Alternating, three times each: the machine's other load moves the
	// figures between runs.
	for _, replicas := range []string{"1", "3", "1", "3", "1", "3"} {
		args := []string{"bench", "--database-url", testenv.DatabaseURL(), "--nats-url", c.urls(),
			"--stream-replicas", replicas, "--events", "20000", "--rates", "2000", "--duration", "3s", "--no-idle", "--json"}
		cmd := exec.Command(publisherBin, args...)
		cmd.Env = binaryEnv()
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("bench --stream-replicas %s: %v\n%s", replicas, err, stderr.String())
		}
		var f figures
		if err := json.Unmarshal(out, &f); err != nil {
			t.Fatalf("bench output: %v\n%s", err, out)
		}
		rows = append(rows, fmt.Sprintf("| R%s | %.0f | %.0f | %.0f | %.2f | %.1f | %.1f |", replicas, f.DBLimit, f.NATSLimit, f.Drain,
			f.Drain/min(f.DBLimit, f.NATSLimit), f.Latency.P50, f.Latency.P99))
	}
	fmt.Printf("\n| stream | database limit (events/s) | NATS limit (events/s) | publisher drain (events/s) | drain ratio | latency p50 at 2,000/s (ms) | p99 (ms) |\n|---|---|---|---|---|---|---|\n%s\n\n",
		strings.Join(rows, "\n"))
}
