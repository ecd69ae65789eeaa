package poller

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"time"

	"github.com/pgnats/outbox/schema"
)

// Leadership: one active publisher per events table, or, with partitions,
// several that each lease a share of the entities (leases.go).
//
// Keys. Two advisory locks are keyed by (namespace, oid of the events
// table), so tables of the same name in different schemas never share one:
//
//	leaderKey  (session lock)  held by the active publisher on a dedicated
//	                           connection for as long as it leads (shared
//	                           by partitioned publishers).
//	barrierKey (xact lock)     every claim transaction takes it shared; a
//	                           new leader takes it exclusive once, which
//	                           waits until every claim transaction of the
//	                           previous leader has ended. A new leader also
//	                           waits out partitioned publishers' claims on
//	                           partsBarrierKey (leases.go).
//
// States:
//
//	standby --pg_try_advisory_lock(leaderKey) = true--> barrier
//	barrier --pg_advisory_lock(barrierKey); unlock-->   leading
//	leading --heartbeat or fence fails-->               standby (connection closed)
//	leading --Run returns-->                            released (connection closed)
//
// Why the barrier: a leader that is frozen (SIGSTOP, a long GC pause, a
// network partition) loses its lock connection after idle_session_timeout,
// while its claim transaction, still holding row locks, lives until
// idle_in_transaction_session_timeout. Without the barrier a new leader
// would SKIP LOCKED past an entity's first event and publish its second.
//
// Fencing: the claim and the mark each carry a condition that the leader
// lock is held by this leader's lock session (pg_locks), so a leader that
// lost its lock claims nothing and marks nothing; its rows stay READY. The
// session is named by a token, not by its backend pid: PostgreSQL reuses
// pids, and a new backend with the pid of a dead lock session (another
// publisher's lock session, say) would pass a fence on the pid. The token
// is a random key of sessionNamespace that the lock session takes, on
// connecting, as a session lock: only that session ever holds it.
//
// Replica ids: a partitioned publisher also holds, on its lock session, a
// session lock keyed by a hash of the table and its replica id
// (replicaNamespace), so two live processes never run under the same id.
// A process that finds it held waits up to dupWait (a dead or frozen
// holder's session ends within LeaderTimeout plus keepalive probes), then
// gives up with ErrReplicaIDInUse.
//
// A dead leader loses the lock when its connection ends: at once on a
// process crash (the kernel closes the socket), within LeaderTimeout when it
// hangs (idle_session_timeout on the lock connection, whose heartbeat stops)
// and within about the same time on a silent network failure (server-side
// TCP keepalives).
const (
	leaderNamespace  = 0x6f627831 // "obx1"
	barrierNamespace = 0x6f627832 // "obx2"
	sessionNamespace = 0x6f627836 // "obx6": a lock session's token
	replicaNamespace = 0x6f627837 // "obx7": a replica id in use
)

// ErrReplicaIDInUse is returned by Run when another live publisher of the
// table runs under the same Config.ReplicaID (after waiting, in case that
// one is a dead process whose session has not ended yet).
var ErrReplicaIDInUse = errors.New("replica id in use by another live publisher")

// leader owns the dedicated lock connection and its heartbeat goroutine.
type leader struct {
	dsn       string
	tableOID  int64
	heartbeat time.Duration
	timeout   time.Duration
	// waitMax bounds every statement and lock wait of the lock session:
	// the barrier may wait that long for a frozen leader's claim.
	waitMax time.Duration
	// shared: a partitioned publisher, which holds the leader lock shared
	// with its peers, and renews its leases with renew (run with renewArgs)
	// on every heartbeat.
	shared      bool
	renew       string
	renewArgs   []any
	renewFailed func(error) // called from the heartbeat goroutine
	// replicaID, when set, is locked on the session before the leader lock;
	// idLocked: the session holds that lock.
	replicaID string
	idLocked  bool

	db   *sql.DB   // a pool of one: the session that tries for, then holds, the lock
	conn *sql.Conn // that session; kept open by a standby between tries
	// connMu serialises the heartbeat and the loop (sleep lock) on conn: a
	// *sql.Conn used from two goroutines at once mixes up their protocol
	// messages.
	connMu sync.Mutex
	held   bool // conn holds the lock
	pid    int  // backend pid holding the session lock
	token  int  // key of the session lock naming conn (sessionNamespace)
	// sleeping: this session holds the sleep lock (schema.SleepLockNamespace)
	sleeping bool
	stop     context.CancelFunc
	wg       sync.WaitGroup
	lost     chan struct{} // closed by the heartbeat when the lock connection fails
	lostErr  error         // why; read after lost is closed
}

// tryAcquire tries once to become leader. It returns false with a nil error
// when another publisher leads; the session stays open for the next try.
func (l *leader) tryAcquire(ctx context.Context) (bool, error) {
	if l.conn == nil {
		if err := l.connect(ctx); err != nil {
			return false, err
		}
	}
	if l.replicaID != "" && !l.idLocked {
		if err := l.lockReplicaID(ctx); err != nil {
			return false, err
		}
	}
	var (
		won sql.NullBool // NULL: the server is in recovery, the lock was not tried
		pid int
	)
	try := "pg_try_advisory_lock"
	if l.shared {
		try = "pg_try_advisory_lock_shared"
	}
	// Advisory locks work on a hot standby too: without the recovery
	// check a publisher whose session landed on a standby (a multi-host
	// DSN without target_session_attrs) would lead there, unable to claim.
	err := l.conn.QueryRowContext(ctx, `SELECT CASE WHEN pg_is_in_recovery() THEN NULL
			ELSE `+try+`($1, $2::bigint::oid::int) END, pg_backend_pid()`,
		leaderNamespace, l.tableOID).Scan(&won, &pid)
	ok := won.Bool
	switch {
	case err != nil:
		err = fmt.Errorf("try leader lock: %w", err)
	case !won.Valid:
		err = errStandbyServer
	case ok:
		err = l.barrier(ctx, l.conn)
	}
	if err != nil {
		l.disconnect() // a lock won above ends with the session
		return false, err
	}
	if !ok {
		return false, nil
	}
	hbCtx, stop := context.WithCancel(context.Background())
	l.held, l.pid, l.stop, l.lost = true, pid, stop, make(chan struct{})
	l.wg.Add(1)
	go l.beat(hbCtx, l.conn, l.lost)
	return true, nil
}

// connect opens the lock session and configures it, before any lock is
// taken, so a leader that hangs right after winning still loses the lock
// in time.
func (l *leader) connect(ctx context.Context) error {
	db, err := sql.Open("postgres", l.dsn)
	if err != nil {
		return err
	}
	db.SetMaxOpenConns(1)
	db.SetMaxIdleConns(1)
	db.SetConnMaxLifetime(0)
	conn, err := db.Conn(ctx)
	if err != nil {
		db.Close()
		return fmt.Errorf("connect for leader lock: %w", err)
	}
	l.db, l.conn = db, conn
	secs := strconv.Itoa(max(1, int(l.timeout/time.Second)))
	if _, err := conn.ExecContext(ctx, `SELECT set_config('tcp_keepalives_idle', $1, false),
			set_config('tcp_keepalives_interval', '1', false),
			set_config('tcp_keepalives_count', '3', false),
			set_config('lock_timeout', $2, false),
			set_config('statement_timeout', $2, false),
			set_config('idle_in_transaction_session_timeout', $2, false),
			set_config('application_name', 'pgnats-outbox leader', false)`, secs, pgDuration(l.waitMax)); err != nil {
		l.disconnect()
		return fmt.Errorf("configure leader connection: %w", err)
	}
	// idle_session_timeout exists from PostgreSQL 14; on 13 a hung leader
	// loses its lock through the keepalives alone, and only if its host
	// stops answering them. A standby's tries keep its session from idling.
	if _, err := conn.ExecContext(ctx, `SELECT set_config('idle_session_timeout', $1, false)
			WHERE current_setting('server_version_num')::int >= 140000`,
		strconv.Itoa(int(l.timeout/time.Millisecond))); err != nil {
		l.disconnect()
		return fmt.Errorf("configure leader connection: %w", err)
	}
	// The token: a key no live session holds (a try that fails means one
	// does; draw again).
	for {
		var ok bool
		token := int(rand.Int32())
		if err := conn.QueryRowContext(ctx, `SELECT pg_try_advisory_lock($1, $2)`,
			sessionNamespace, token).Scan(&ok); err != nil {
			l.disconnect()
			return fmt.Errorf("take session token: %w", err)
		}
		if ok {
			l.token = token
			return nil
		}
	}
}

// replicaKeySQL is the key, in replicaNamespace, of replica id $2 of the
// table whose oid is $1.
const replicaKeySQL = `hashtext($1::bigint::text || '/' || $2)`

// lockReplicaID takes the replica id's session lock, or returns an error
// wrapping ErrReplicaIDInUse that names the session holding it.
func (l *leader) lockReplicaID(ctx context.Context) error {
	var ok bool
	if err := l.conn.QueryRowContext(ctx, `SELECT pg_try_advisory_lock($3, `+replicaKeySQL+`)`,
		l.tableOID, l.replicaID, replicaNamespace).Scan(&ok); err != nil {
		l.disconnect()
		return fmt.Errorf("lock replica id: %w", err)
	}
	if ok {
		l.idLocked = true
		return nil
	}
	var (
		pid    sql.NullInt64
		client sql.NullString
		since  sql.NullTime
	)
	// The holder may be gone by now: the error then names no session.
	_ = l.conn.QueryRowContext(ctx, `SELECT l.pid, host(a.client_addr), a.backend_start
		FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
		WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $3::bigint::oid
		  AND l.objid = `+replicaKeySQL+`::oid AND l.objsubid = 2
		  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())`,
		l.tableOID, l.replicaID, replicaNamespace).Scan(&pid, &client, &since)
	return fmt.Errorf("%w: replica id %q is held by backend pid %d (client %s, connected %s)",
		ErrReplicaIDInUse, l.replicaID, pid.Int64, cmp.Or(client.String, "local"), since.Time.UTC().Format(time.RFC3339))
}

// errStandbyServer is returned by tryAcquire when the lock session reached
// a server in recovery (a standby): leading there would only fail to
// claim. The session is closed, so the next try connects again, to the
// primary if the DSN says how to find it.
var errStandbyServer = errors.New("the database server is a read-only standby (in recovery), not the primary: " +
	"point the DSN at the primary or at a name that follows it; with several hosts, add target_session_attrs=read-write")

// disconnect closes the lock session (and with it any lock it held).
func (l *leader) disconnect() {
	if l.conn != nil {
		l.conn.Close()
		l.db.Close()
	}
	l.db, l.conn, l.idLocked = nil, nil, false
}

// barrier waits until no claim transaction of an earlier leader is open:
// of a single leader, and for a new single leader also of partitioned
// publishers. (A partitioned publisher joining waits for no peer: the
// partition barriers order them.)
func (l *leader) barrier(ctx context.Context, db *sql.Conn) error {
	namespaces := []int{barrierNamespace}
	if !l.shared {
		namespaces = append(namespaces, partsBarrierNamespace)
	}
	for _, ns := range namespaces {
		if _, err := db.ExecContext(ctx, `SELECT pg_advisory_lock($1, $2::bigint::oid::int)`, ns, l.tableOID); err != nil {
			return fmt.Errorf("wait for previous leader's transactions: %w", err)
		}
		if _, err := db.ExecContext(ctx, `SELECT pg_advisory_unlock($1, $2::bigint::oid::int)`, ns, l.tableOID); err != nil {
			return fmt.Errorf("release barrier: %w", err)
		}
	}
	return nil
}

// beat keeps the lock connection busy, so idle_session_timeout only fires
// when this process stops running, and reports a failed connection.
func (l *leader) beat(ctx context.Context, db *sql.Conn, lost chan struct{}) {
	defer l.wg.Done()
	t := time.NewTicker(l.heartbeat)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		l.connMu.Lock()
		hctx, cancel := context.WithTimeout(ctx, l.timeout)
		var pid int
		err := db.QueryRowContext(hctx, `SELECT pg_backend_pid()`).Scan(&pid)
		if err == nil && l.renew != "" {
			// A failed renewal (a lock timeout, say) is not a lost session:
			// the leases may lapse, which the fences and the next lease
			// round handle. The pid check above catches a dead session.
			if _, rerr := db.ExecContext(hctx, l.renew, l.renewArgs...); rerr != nil && l.renewFailed != nil {
				l.renewFailed(rerr)
			}
		}
		cancel()
		l.connMu.Unlock()
		if ctx.Err() != nil {
			return
		}
		if err != nil || pid != l.pid {
			// The session, and with it the lock, is gone (or about to be).
			if err == nil {
				err = fmt.Errorf("backend pid changed from %d to %d", l.pid, pid)
			}
			l.lostErr = err
			close(lost)
			return
		}
	}
}

// lostCh is closed when the heartbeat sees the lock connection fail; nil
// (blocks forever) when not leading.
func (l *leader) lostCh() <-chan struct{} { return l.lost }

// isLost reports whether the heartbeat saw the lock session fail.
func (l *leader) isLost() bool {
	select {
	case <-l.lost:
		return true
	default:
		return false
	}
}

// release gives up leadership by closing the lock connection.
func (l *leader) release() {
	if l.held {
		l.stop()
		l.wg.Wait()
	}
	l.disconnect()
	l.held, l.pid, l.token, l.lost, l.sleeping = false, 0, 0, nil, false
}

// leading reports whether this process currently believes it leads.
func (l *leader) leading() bool { return l.held }

// errLostLeadership means a fence check failed: another publisher may lead.
var errLostLeadership = errors.New("lost leadership")

// fenceSQL is true while the leader lock is held by the session that holds
// the token $tokenParam (the leader's lock session: whatever its pid, no
// other session holds that token). It is added to the claim and the mark;
// the parameters are numbered by the caller.
func fenceSQL(nsParam, oidParam, tokenParam int) string {
	return fmt.Sprintf(`EXISTS (SELECT 1 FROM pg_locks l
		WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
		  AND ((l.classid = $%d::bigint::oid AND l.objid = $%d::bigint::oid)
		    OR (l.classid = %d::oid AND l.objid = $%d::bigint::oid))
		GROUP BY l.pid
		HAVING count(DISTINCT l.classid) = 2)`, nsParam, oidParam, sessionNamespace, tokenParam)
}

// trySleep takes the sleep lock on the leader's session (see the insert
// trigger in schema/): from then on writers NOTIFY. It fails while a writer
// that skipped its NOTIFY has not committed yet. When another publisher's
// session holds the lock (partitioned publishers share the table), writers
// notify already: it reports true without taking it, and that publisher
// notifies when it releases the lock (wake).
func (l *leader) trySleep(ctx context.Context) (bool, error) {
	var mine, other bool
	l.connMu.Lock()
	defer l.connMu.Unlock()
	err := l.conn.QueryRowContext(ctx, `SELECT pg_try_advisory_lock($1, $2::bigint::oid::int),
		EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::bigint::oid
			AND objid = $2::bigint::oid AND objsubid = 2 AND mode = 'ExclusiveLock'
			AND granted AND pid <> pg_backend_pid())`,
		schema.SleepLockNamespace, l.tableOID).Scan(&mine, &other)
	l.sleeping = mine
	return mine || other, err
}

// wake releases the sleep lock if this session holds it: writers stop
// sending NOTIFY. A partitioned publisher then notifies once itself, so
// peers that slept on its lock look again.
func (l *leader) wake(ctx context.Context) error {
	if !l.sleeping {
		return nil
	}
	query, args := `SELECT pg_advisory_unlock($1, $2::bigint::oid::int)`, []any{schema.SleepLockNamespace, l.tableOID}
	if l.shared {
		query, args = query+`, pg_notify($3, '')`, append(args, schema.Channel(l.tableOID))
	}
	l.connMu.Lock()
	_, err := l.conn.ExecContext(ctx, query, args...)
	l.connMu.Unlock()
	if err == nil {
		l.sleeping = false
	}
	return err
}
