// Package poller is the publish loop: it moves READY events from the outbox
// table to NATS JetStream and marks them SUCCESS once JetStream has
// acknowledged them.
//
// The loop, for the process that holds leadership (leader.go):
//
//	wait   until woken: NOTIFY on the table's channel, the fallback poll
//	       interval, or at once after a full batch
//	claim  up to BatchSize due READY rows, BatchBytes in all, in seq order
//	       (claim.go)
//	check  each row's subject maps to a stream that can take its size;
//	       a row that cannot be published is refused without being sent,
//	       and later rows of its entity in the batch are left for later
//	send   the rest asynchronously, Nats-Msg-Id = event id
//	wait   for every PubAck, up to AckTimeout
//	mark   acked rows SUCCESS, refused rows retry or FAILED; commit
//
// Errors are sorted by whose fault they are. An unreachable or slow broker
// or database, "no responders" for a subject a stream does cover, a
// JetStream error code not known to refuse one message (a full stream, a
// stream temporarily unavailable, ...) or a missing PubAck: the rows stay READY with attempts unchanged
// and the whole loop backs off (capped exponential, jittered). A refusal of
// one event (no stream for its subject, too large): attempts+1 and a retry
// time in SQL time, or FAILED with last_error once retrying cannot help or
// MaxAttempts is reached. The entity of a refused event is blocked until it
// is published or requeued; other entities go on.
//
// While the table's pause switch is on (pause.go, read at most once a
// second), the loop claims nothing and finishes the batch in flight.
//
// On cancellation Run stops claiming, finishes the batch in flight (acks and
// mark) and returns nil.
package poller

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lib/pq"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgnats/outbox/internal/wire"
	"github.com/pgnats/outbox/schema"
)

// Waiting between claims. A publisher that found work within idleAfter
// polls again after activePoll; writers send no NOTIFY meanwhile. Once idle
// longer, it takes the sleep lock (schema.SleepLockNamespace), which turns
// the writers' NOTIFY on, looks once more and sleeps until a NOTIFY or
// PollInterval. If the lock cannot be taken, a writer that skipped its
// NOTIFY is still in its transaction, and the publisher keeps polling and
// trying the lock, after activePoll at first, then twice as long after each
// failed try, up to PollInterval.
//
//	active   --idle for idleAfter, sleep lock taken-->  last look
//	last look --found rows-->                            active (lock released)
//	last look --nothing-->                               asleep
//	asleep   --NOTIFY or PollInterval-->                 active (lock released)
//	active   --idle, sleep lock not taken-->             active, polling less often
const (
	activePoll = time.Millisecond
	idleAfter  = 250 * time.Millisecond
)

// DefaultBatchBytes is the default of Config.BatchBytes and of
// ReplayOptions.PageBytes: 32 MiB, so a publisher with two batches of events
// in memory stays well within a 256 MiB container.
const DefaultBatchBytes = 32 << 20

// Config configures a Poller. DB, DSN and NATS are required; every other
// zero field means its default.
type Config struct {
	// DB is the pool used for claims and marks. The loop holds up to three
	// of its connections at once (a claim, the batch in flight, a mark in
	// the background): keep SetMaxIdleConns at 3 or more (database/sql's
	// default is 2), or the pool closes and reopens a connection, and
	// prepares the statements again, every batch. If SetMaxOpenConns is
	// set, give it 4 or more: the loop prepares its statements on the pool,
	// which takes a connection besides those it holds, so with 2 it stalls
	// and with 3 a statement prepared again under load waits for a mark.
	DB *sql.DB
	// DSN opens the session-level connections: LISTEN and the leader
	// lock. It must reach PostgreSQL directly, not through a pooler in
	// transaction mode.
	DSN string
	// NATS is the connection to publish on. Connect it with
	// nats.ReconnectBufSize(-1): messages buffered during a reconnect are
	// sent after it, behind earlier ones the disconnect lost, which breaks
	// per-entity order. New refuses a connection with a buffer.
	NATS *nats.Conn
	// Table is the events table. Default "events".
	Table string
	// MaxControlLine is the NATS server's max_control_line, in bytes,
	// which the server's INFO does not announce: a row whose protocol line
	// (subject, reply subject and sizes) is longer is FAILED with the
	// reason, never sent, since the server would close the connection for
	// it. Default wire.DefaultMaxControlLine (4096), nats-server's default.
	MaxControlLine int
	// BatchSize is the most rows claimed at once. Default 500.
	BatchSize int
	// BatchBytes is the most bytes of payload and stored headers claimed
	// at once; a first due event larger than it is claimed alone. The loop
	// holds at most two batches (one sending, one waiting for its acks),
	// so about twice BatchBytes of events in memory. Default 32 MiB
	// (DefaultBatchBytes).
	BatchBytes int
	// PollInterval is the fallback poll when no NOTIFY arrives.
	// Default 1s.
	PollInterval time.Duration
	// NoListen turns LISTEN/NOTIFY off: poll only.
	NoListen bool
	// AckTimeout is how long a batch waits for its PubAcks. Default 5s.
	AckTimeout time.Duration
	// MaxAttempts is how many refusals an event gets before FAILED.
	// Default 10.
	MaxAttempts int
	// RetryBase and RetryMax bound the delay before a refused event is
	// tried again, counted from the refusal: RetryBase * 2^attempts, at
	// most RetryMax.
	// Defaults 1s and 5m.
	RetryBase, RetryMax time.Duration
	// BackoffMin and BackoffMax bound the whole loop's back-off during an
	// outage. Defaults 100ms and 30s.
	BackoffMin, BackoffMax time.Duration
	// LeaderTimeout is how soon a hung leader loses its lock
	// (idle_session_timeout of its lock connection). Default 5s.
	LeaderTimeout time.Duration
	// Partitions, when positive, runs this publisher as one of several
	// active ones: entities hash into Partitions partitions, and each
	// publisher leases a share of them (leases.go). Every publisher of the
	// table must use the same count. Zero: a single leader publishes
	// everything while the others stand by. At most MaxPartitions.
	Partitions int
	// ReplicaID names this publisher in the lease tables. Default: host
	// name, process id and a random suffix. Two live publishers of a table
	// never run under one id: Run waits up to 2 × (LeaderTimeout + 3s) for
	// another session holding it to end, then returns ErrReplicaIDInUse.
	ReplicaID string
	// Logger receives the loop's logs. Default: discard.
	Logger *slog.Logger
	// Metrics receives the loop's counters and histograms. Default: nil,
	// record nothing.
	Metrics *Metrics
	// SkipPublish makes the loop claim and mark without publishing, to
	// measure the database's share of the work (publisher bench). Never set
	// it in production: events would be marked SUCCESS unsent.
	SkipPublish bool
}

func (c Config) withDefaults() Config {
	c.Table = cmp.Or(c.Table, schema.DefaultEvents)
	c.BatchSize = cmp.Or(c.BatchSize, 500)
	c.MaxControlLine = cmp.Or(c.MaxControlLine, wire.DefaultMaxControlLine)
	c.BatchBytes = cmp.Or(c.BatchBytes, DefaultBatchBytes)
	c.PollInterval = cmp.Or(c.PollInterval, time.Second)
	c.AckTimeout = cmp.Or(c.AckTimeout, 5*time.Second)
	c.MaxAttempts = cmp.Or(c.MaxAttempts, 10)
	c.RetryBase = cmp.Or(c.RetryBase, time.Second)
	c.RetryMax = cmp.Or(c.RetryMax, 5*time.Minute)
	c.BackoffMin = cmp.Or(c.BackoffMin, 100*time.Millisecond)
	c.BackoffMax = cmp.Or(c.BackoffMax, 30*time.Second)
	c.LeaderTimeout = cmp.Or(c.LeaderTimeout, 5*time.Second)
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Partitions > 0 && c.ReplicaID == "" {
		c.ReplicaID = defaultReplicaID()
	}
	return c
}

func (c Config) validate() error {
	switch {
	case c.DB == nil:
		return errors.New("poller: DB is required")
	case c.DSN == "":
		return errors.New("poller: DSN is required")
	case c.NATS == nil:
		return errors.New("poller: NATS is required")
	case c.NATS.Opts.ReconnectBufSize >= 0:
		return errors.New("poller: the NATS connection buffers publishes while reconnecting, which can reorder an entity's events: connect with nats.ReconnectBufSize(-1)")
	case c.BatchSize < 0, c.BatchBytes < 0, c.PollInterval < 0, c.AckTimeout < 0, c.MaxAttempts < 0,
		c.RetryBase < 0, c.RetryMax < 0, c.BackoffMin < 0, c.BackoffMax < 0, c.LeaderTimeout < 0:
		return errors.New("poller: sizes and durations must not be negative")
	case c.Partitions < 0 || c.Partitions > MaxPartitions:
		return fmt.Errorf("poller: partitions must be between 0 (single leader) and %d", MaxPartitions)
	}
	if _, err := schema.ParseName(cmp.Or(c.Table, schema.DefaultEvents)); err != nil {
		return fmt.Errorf("poller: %w", err)
	}
	return nil
}

// Stats are the loop's running totals since New.
type Stats struct {
	Published int64 // events acked by JetStream and marked SUCCESS
	Refused   int64 // refusals recorded (retry scheduled or FAILED)
	Failed    int64 // events moved to FAILED
	Batches   int64 // batches committed
	Backoffs  int64 // times the loop backed off for an outage
	// OrderViolations counts events stored by JetStream after an earlier
	// event of their entity, sent ahead of them, was not (see
	// Metrics.OrderViolations).
	OrderViolations int64
	// Leader: this process leads now; with partitions, it takes part
	// (holds the leader lock shared).
	Leader bool
	// Partitions is the number of partitions this process publishes now
	// (always 0 without partitions).
	Partitions int
	// Paused: the table's pause switch is on, as last read (see Pause).
	Paused bool
}

// Poller is the publish loop of one events table. Run it once.
type Poller struct {
	cfg      Config
	db       *sql.DB
	js       jetstream.JetStream
	table    schema.Name
	tableOID int64
	q        queries
	lead     leader
	parts    *partitions // nil: single-leader mode
	streams  *streamCache
	// mapped holds subjects no stream filter covers that JetStream stored
	// anyway (an account subject mapping sends them to a stream): the loop
	// then publishes them asynchronously like any other. Only the publish
	// loop uses it; at most subjectsKept entries, then it starts over.
	mapped  map[string]bool
	log     *slog.Logger
	standby bool // standby already logged
	// dupSince: since when another session holds this replica id; dupErr:
	// held for longer than dupWait, Run returns it.
	dupSince time.Time
	dupErr   error
	stmts    map[string]*sql.Stmt  // prepared statements, by query
	inflight *batch                // sent, not yet finished; see step
	marking  *pendingMark          // acked, its mark running; see finish
	held     map[string]heldEntity // entities the claims leave out for now; see holdBack
	busy     bool                  // the last claim found rows
	// slowClaims: the last claim took long (see claimLimits); the loop
	// claims only once the batch ahead is finished.
	slowClaims bool
	suspect    bool                  // a batch hit an outage: ask the broker before claiming
	faults     int                   // tries in a row that failed with a lasting database error; see noteFault
	fault      atomic.Pointer[Fault] // see Fault
	// carefulUntil: until then, one event per entity a batch and no
	// pipelining (see carefulFor).
	carefulUntil time.Time
	// pause is the pause switch as last read (nil before the first read),
	// at pauseRead; see checkPause.
	pause     atomic.Pointer[PauseState]
	pauseRead time.Time
	pauseErr  bool // the last read of the switch failed, and was logged

	published, refused, failed, batches, backoffs, heldCount atomic.Int64
	violations                                               atomic.Int64
	leading                                                  atomic.Bool
	// lockPID is the lock session's backend pid while leading: a NOTIFY
	// it sent (wake, partitioned mode) is not news to this publisher.
	lockPID atomic.Int64
}

// New checks cfg and returns a Poller. It does not connect; Run does.
func New(cfg Config) (*Poller, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	table, _ := schema.ParseName(cfg.Table)
	js, err := jetstream.New(cfg.NATS,
		jetstream.WithPublishAsyncTimeout(cfg.AckTimeout),
		jetstream.WithPublishAsyncMaxPending(max(cfg.BatchSize*2, 256)))
	if err != nil {
		return nil, fmt.Errorf("poller: jetstream: %w", err)
	}
	p := &Poller{
		cfg:     cfg,
		db:      cfg.DB,
		js:      js,
		table:   table,
		q:       newQueries(table.Quoted(), table.Leases().Quoted(), cfg.Partitions),
		lead:    leader{dsn: cfg.DSN, heartbeat: cfg.LeaderTimeout / 5, timeout: cfg.LeaderTimeout},
		streams: newStreamCache(js),
		stmts:   map[string]*sql.Stmt{},
		held:    map[string]heldEntity{},
		log:     cfg.Logger,
	}
	p.lead.waitMax = 2 * p.idleInTx()
	if cfg.Metrics != nil {
		cfg.Metrics.PartitionsConfigured.Set(float64(cfg.Partitions))
	}
	if cfg.Partitions > 0 {
		p.parts = &partitions{count: cfg.Partitions, id: cfg.ReplicaID,
			leases: table.Leases().Quoted(), replicas: table.Replicas().Quoted(),
			retry: backoff{min: cfg.LeaderTimeout / 5, max: cfg.LeaderTimeout}}
		p.lead.shared = true
		p.lead.replicaID = cfg.ReplicaID
		p.lead.renew = p.parts.renewSQL()
		p.lead.renewArgs = []any{cfg.ReplicaID, p.leaseTTL().Milliseconds()}
		p.lead.renewFailed = func(err error) { p.log.Warn("renew leases", "err", err) }
	}
	return p, nil
}

// Stats returns the running totals. Safe to call from any goroutine.
func (p *Poller) Stats() Stats {
	return Stats{
		Published: p.published.Load(), Refused: p.refused.Load(), Failed: p.failed.Load(),
		Batches: p.batches.Load(), Backoffs: p.backoffs.Load(), Leader: p.leading.Load(),
		Partitions: int(p.heldCount.Load()), OrderViolations: p.violations.Load(),
		Paused: p.Pause().Paused,
	}
}

// Partitioned reports whether this publisher runs with partition leases.
func (p *Poller) Partitioned() bool { return p.parts != nil }

// idleInTx bounds how long a claim transaction may sit idle: longer than a
// batch can legitimately wait for acks, short enough that a frozen
// leader's row locks do not hold its successor for long.
func (p *Poller) idleInTx() time.Duration { return 2*p.cfg.AckTimeout + 5*time.Second }

// ErrNATSClosed is returned by Run when the NATS connection is closed for
// good: by the server for a protocol error, or after refused credentials.
// nats.go never reconnects a closed connection, so the caller must connect
// again and run a new Poller on the new connection.
var ErrNATSClosed = errors.New("the NATS connection is closed for good")

// Run publishes until ctx is cancelled, then finishes the batch in flight
// and returns nil. It returns an error only for a setup failure that
// retrying cannot fix: a missing events table, or (ErrReplicaIDInUse)
// another live publisher of the table running under this ReplicaID. It
// returns one wrapping ErrNATSClosed, after finishing the batch in flight,
// when the NATS connection is closed.
func (p *Poller) Run(ctx context.Context) error {
	if err := p.resolveTable(ctx); err != nil {
		return err
	}
	wake := make(chan struct{}, 1)
	var wg sync.WaitGroup
	if !p.cfg.NoListen {
		l := pq.NewListener(p.cfg.DSN, 100*time.Millisecond, p.cfg.BackoffMax, p.listenerEvent)
		if err := l.Listen(schema.Channel(p.tableOID)); err != nil {
			p.log.Warn("listen failed; polling only until it reconnects", "err", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			forward(ctx, l.Notify, wake, &p.lockPID)
		}()
		defer func() {
			l.Close()
			wg.Wait()
		}()
	}
	defer p.stepDown()
	defer p.closeStmts()

	bo := backoff{min: p.cfg.BackoffMin, max: p.cfg.BackoffMax}
	var (
		lastWork time.Time // when a claim last found rows
		sleeping bool      // this session holds the sleep lock
		// lockWait is the pause after the sleep lock could not be taken;
		// it doubles with each failed try, up to the idle poll.
		lockWait = activePoll
	)
	for ctx.Err() == nil {
		if p.cfg.NATS.IsClosed() {
			return p.stopClosed(ctx)
		}
		paused := p.checkPause(ctx)
		if !p.lead.leading() {
			sleeping = false
			if !p.elect(ctx, &bo) {
				if p.dupErr != nil {
					break
				}
				continue
			}
			lastWork = time.Now()
		}
		p.rebalanceIfDue(ctx)
		if paused {
			// Claim nothing: finish the batch in flight, stop the writers'
			// NOTIFYs and look at the switch again in a while.
			if err := p.drain(ctx); err != nil {
				p.log.Warn("finishing the batch in flight while paused", "err", err)
			}
			if sleeping {
				sleeping = !p.wakeUp(ctx)
			}
			p.sleep(ctx, pauseCheckEvery, nil)
			lastWork = time.Now()
			continue
		}
		n, healthy, err := p.step(ctx)
		switch {
		case errors.Is(err, errLostLeadership) && p.parts != nil && !p.lead.isLost():
			// A lease, or the lock session before the heartbeat has seen
			// it go: take stock at once.
			p.log.Warn("a partition lease or the lock session was lost; rebalancing", "err", err)
			p.parts.next = time.Time{}
			continue
		case errors.Is(err, errLostLeadership):
			p.log.Warn("leadership lost; standing by", "err", err)
			p.stepDown()
			continue
		case err != nil && ctx.Err() != nil:
			continue // stopping: the error is the cancellation itself
		case err != nil && p.cfg.NATS.IsClosed():
			continue // no back-off: Run returns at the top of the loop
		case err != nil:
			if sleeping {
				sleeping = !p.wakeUp(ctx)
			}
			p.noteFault(err)
			p.backoffs.Add(1)
			p.cfg.Metrics.backoff()
			d := bo.next()
			p.log.Warn("publish loop backing off", append([]any{"err", err, "backoff", d}, faultAttrs(err)...)...)
			p.sleep(ctx, d, nil)
			continue
		}
		if healthy {
			p.noteFault(nil)
			// Only a batch that went through, or a look that found nothing
			// due, ends an outage: a step that merely claimed and sent
			// proves nothing yet, and resetting on it would keep the
			// back-off at its minimum for the whole outage.
			bo.reset()
		}
		if n > 0 {
			lastWork = time.Now()
			lockWait = activePoll
		}
		switch {
		case sleeping:
			// The last look, under the sleep lock, is done: sleep unless it
			// found work, then stop the writers' NOTIFYs.
			if n == 0 {
				p.sleep(ctx, p.idlePoll(), wake)
			}
			sleeping = !p.wakeUp(ctx)
		case n >= p.cfg.BatchSize, p.inflight != nil:
			// More may be waiting, or a batch is in flight: claim again at
			// once (the next step finishes the batch in flight).
		case time.Since(lastWork) < idleAfter:
			p.sleep(ctx, activePoll, wake)
		case p.cfg.NoListen:
			p.sleep(ctx, p.idlePoll(), nil)
		default:
			switch ok, err := p.lead.trySleep(ctx); {
			case err != nil:
				// The lock session is failing; the heartbeat will notice.
				// Poll meanwhile rather than retry at once.
				p.log.Warn("take sleep lock; polling", "err", err)
				p.sleep(ctx, p.idlePoll(), wake)
			case ok:
				sleeping = true // look once more, then sleep
				lockWait = activePoll
			default:
				// A writer that skipped its NOTIFY is mid-transaction. Its
				// event shows up only through a poll, but the transaction may
				// stay open for long: poll less often the longer it does, so
				// an idle publisher costs no more than its poll interval.
				p.sleep(ctx, lockWait, wake)
				lockWait = min(2*lockWait, max(p.idlePoll(), activePoll))
			}
		}
	}
	if err := p.drain(ctx); err != nil {
		p.log.Warn("finishing the last batch", "err", err)
	}
	p.log.Info("publisher stopped", "published", p.published.Load())
	return p.dupErr
}

// stopClosed finishes the batch in flight (its acks will not come, so its
// rows stay READY) and returns the error Run returns for a closed NATS
// connection.
func (p *Poller) stopClosed(ctx context.Context) error {
	if err := p.drain(ctx); err != nil {
		p.log.Warn("finishing the last batch", "err", err)
	}
	err := fmt.Errorf("poller: %w", ErrNATSClosed)
	if last := p.cfg.NATS.LastError(); last != nil {
		err = fmt.Errorf("poller: %w: %w", ErrNATSClosed, last)
	}
	p.log.Error("NATS connection closed for good; stopping", "err", err, "published", p.published.Load())
	return err
}

// rebalanceIfDue runs a lease round when one is due (partitioned mode). A
// round that fails is logged and postponed; it never stops the loop from
// publishing the leases it holds (the claim's fence checks each of them).
func (p *Poller) rebalanceIfDue(ctx context.Context) {
	pt := p.parts
	if pt == nil || time.Now().Before(pt.next) {
		return
	}
	err := p.rebalance(ctx)
	switch {
	case err == nil:
		pt.retry.reset()
	case ctx.Err() == nil:
		d := pt.retry.next()
		pt.next = time.Now().Add(d)
		if errors.Is(err, errRoundBusy) && pt.retry.n == 1 {
			// Most likely a peer's round of a few milliseconds.
			p.log.Debug("lease round busy; retrying", "retry_in", d)
			return
		}
		p.log.Warn("lease round failed; publishing the leases held", "err", err, "held", len(pt.held), "retry_in", d)
	}
}

// idlePoll is how long an idle publisher waits for a NOTIFY: the poll
// interval, but no later than its next lease round.
func (p *Poller) idlePoll() time.Duration {
	if p.parts == nil {
		return p.cfg.PollInterval
	}
	return min(p.cfg.PollInterval, max(time.Until(p.parts.next), activePoll))
}

// wakeUp releases the sleep lock and reports whether it did.
func (p *Poller) wakeUp(ctx context.Context) bool {
	if err := p.lead.wake(context.WithoutCancel(ctx)); err != nil {
		p.log.Warn("release sleep lock", "err", err)
		return false
	}
	return true
}

// resolveTable finds the events table's oid, the key of its locks, and
// checks that the table has the payload column this code reads.
func (p *Poller) resolveTable(ctx context.Context) error {
	bo := backoff{min: p.cfg.BackoffMin, max: p.cfg.BackoffMax}
	for {
		var (
			oid     sql.NullInt64
			payload sql.NullString
		)
		err := p.db.QueryRowContext(ctx, resolveTableSQL, p.table.Quoted()).Scan(&oid, &payload)
		switch {
		case err == nil && oid.Valid && payload.String != "bytea":
			// The claim measures and reads payloads as bytes: against an
			// earlier schema it would fail on every try, backing off
			// forever with the process up and looking healthy.
			return fmt.Errorf("events table %s is at an earlier schema version (event_data is %s, not bytea): run 'publisher migrate' first",
				p.table, cmp.Or(payload.String, "missing"))
		case err == nil && oid.Valid:
			p.tableOID, p.lead.tableOID = oid.Int64, oid.Int64
			return nil
		case err == nil:
			return fmt.Errorf("events table %s does not exist: run 'publisher migrate' first", p.table)
		case ctx.Err() != nil:
			return nil
		}
		d := bo.next()
		p.log.Warn("database unreachable; retrying", "err", err, "backoff", d)
		p.sleep(ctx, d, nil)
	}
}

// resolveTableSQL returns the oid of the table named $1 (NULL when there
// is none) and the type of its event_data column.
const resolveTableSQL = `SELECT t.oid::bigint, (SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
	WHERE a.attrelid = t.oid AND a.attname = 'event_data' AND NOT a.attisdropped)
	FROM (SELECT to_regclass($1)::oid AS oid) t`

// elect tries to become leader, waiting a poll interval (or backing off on
// errors) when it does not. It reports whether this process now leads.
func (p *Poller) elect(ctx context.Context, bo *backoff) bool {
	ok, err := p.lead.tryAcquire(ctx)
	if !errors.Is(err, ErrReplicaIDInUse) {
		p.dupSince = time.Time{}
	}
	switch {
	case errors.Is(err, ErrReplicaIDInUse):
		// The holder may be this id's previous process, dead or frozen,
		// whose session is about to end: give it dupWait.
		switch {
		case p.dupSince.IsZero():
			p.dupSince = time.Now()
			p.log.Warn("replica id in use by another session; waiting for it to end", "replica_id", p.parts.id,
				"err", err, "give_up_after", p.dupWait())
		case time.Since(p.dupSince) >= p.dupWait():
			p.log.Error("replica id in use by another live publisher; giving up: give every publisher its own replica id",
				"replica_id", p.parts.id, "err", err)
			p.dupErr = fmt.Errorf("poller: %w", err)
			return false
		}
		p.sleep(ctx, p.cfg.LeaderTimeout/5, nil)
		return false
	case err != nil:
		if ctx.Err() == nil {
			p.noteFault(err)
			d := bo.next()
			p.log.Warn("leader election failed; retrying", append([]any{"err", err, "backoff", d}, faultAttrs(err)...)...)
			p.sleep(ctx, d, nil)
		}
		return false
	case !ok:
		p.noteFault(nil)
		if !p.standby {
			msg := "standing by: another publisher leads"
			if p.parts != nil {
				msg = "standing by: a publisher without --partitions leads"
			}
			p.log.Info(msg, "table", p.table.String())
			p.standby = true
		}
		p.sleep(ctx, min(p.cfg.PollInterval, p.cfg.LeaderTimeout/5), nil)
		return false
	}
	bo.reset()
	p.leading.Store(true)
	p.lockPID.Store(int64(p.lead.pid))
	p.cfg.Metrics.leading(true)
	p.standby = false
	if p.parts != nil {
		p.parts.next = time.Time{} // take a share at once
		p.log.Info("joined as a partitioned publisher", "table", p.table.String(),
			"partitions", p.parts.count, "replica_id", p.parts.id, "pid", p.lead.pid)
		return true
	}
	p.log.Info("leader elected", "table", p.table.String(), "pid", p.lead.pid)
	return true
}

// dupWait is how long a publisher waits for another session to release its
// replica id before giving up: twice the longest a dead or frozen process's
// lock session lives (LeaderTimeout of idle_session_timeout, or the
// keepalive probes of a vanished host, 3 s on top).
func (p *Poller) dupWait() time.Duration { return 2 * (p.cfg.LeaderTimeout + 3*time.Second) }

// stepDown gives up leadership, and in partitioned mode every lease.
func (p *Poller) stepDown() {
	if p.parts != nil && p.lead.leading() {
		p.leave(context.Background())
	}
	p.lead.release()
	p.leading.Store(false)
	p.lockPID.Store(0)
	p.cfg.Metrics.leading(false)
}

// sleep waits for d, ctx, or a wake-up on wake (nil: none).
func (p *Poller) sleep(ctx context.Context, d time.Duration, wake <-chan struct{}) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	case <-wake:
	case <-p.lead.lostCh():
	}
}

func (p *Poller) listenerEvent(ev pq.ListenerEventType, err error) {
	switch ev {
	case pq.ListenerEventConnectionAttemptFailed, pq.ListenerEventDisconnected:
		p.log.Warn("listen connection down; polling until it returns", "err", err)
	case pq.ListenerEventReconnected:
		p.cfg.Metrics.dbReconnect()
		p.log.Info("listen connection restored")
	}
}

// forward turns notifications (nil on reconnect: something may have been
// missed) into non-blocking wake-ups, except those sent by the backend self
// holds (this publisher's own, sent as it leaves its sleep: waking on them
// would make an idle partitioned publisher spin).
func forward(ctx context.Context, in <-chan *pq.Notification, wake chan<- struct{}, self *atomic.Int64) {
	for {
		select {
		case <-ctx.Done():
			return
		case n, ok := <-in:
			if !ok {
				return
			}
			if n != nil && int64(n.BePid) == self.Load() {
				continue
			}
			select {
			case wake <- struct{}{}:
			default:
			}
		}
	}
}

// backoff is capped exponential back-off with full jitter.
type backoff struct {
	min, max time.Duration
	n        int
}

func (b *backoff) next() time.Duration {
	d := b.min << min(b.n, 30)
	if d <= 0 || d > b.max {
		d = b.max
	}
	b.n++
	return d/2 + rand.N(d/2+1)
}

func (b *backoff) reset() { b.n = 0 }

// RetryHorizon is the longest time after a first send that this loop may
// send the same event again without an operator: a missing ack, a failed
// mark and one full back-off. Streams' duplicate windows should exceed it.
func (c Config) RetryHorizon() time.Duration {
	c = c.withDefaults()
	return c.AckTimeout + markGrace + c.BackoffMax
}
