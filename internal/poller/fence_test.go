package poller

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
)

// The fence names the leader's lock session by a token that session alone
// holds, not by its backend pid, which PostgreSQL reuses: a session that
// has the pid of a dead lock session, even one holding the leader lock,
// does not pass a fence made for the dead one.
func TestFenceNamesTheSessionNotItsPID(t *testing.T) {
	t.Parallel()
	db := testenv.NewDB(t)
	var oid int64
	require.NoError(t, db.Get(&oid, `SELECT 'events'::regclass::oid::bigint`))
	ctx := context.Background()
	newLeader := func() *leader {
		return &leader{dsn: db.DSN, tableOID: oid, heartbeat: time.Hour, timeout: 5 * time.Second, waitMax: 10 * time.Second}
	}
	fence := func(token int) bool {
		var ok bool
		require.NoError(t, db.Get(&ok, `SELECT `+fenceSQL(1, 2, 3), leaderNamespace, oid, token))
		return ok
	}

	first := newLeader()
	ok, err := first.tryAcquire(ctx)
	require.NoError(t, err)
	require.True(t, ok)
	require.True(t, fence(first.token), "the leader passes its own fence")
	// A session with the leader's pid but not its token: what a new
	// backend reusing the pid of a dead lock session presents.
	var held int
	require.NoError(t, db.Get(&held, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
		AND classid = $1::bigint::oid AND objid = $2::bigint::oid AND pid = $3 AND granted`,
		sessionNamespace, first.token^1, first.pid))
	require.Zero(t, held, "the leader's session holds no other token")
	require.False(t, fence(first.token^1), "the leader's pid with another token fails the fence")

	standby := newLeader()
	ok, err = standby.tryAcquire(ctx)
	require.NoError(t, err)
	require.False(t, ok, "one leader at a time")
	require.NotEqual(t, first.token, standby.token)
	require.False(t, fence(standby.token), "a session with a token but without the leader lock fails the fence")

	// The leader's session ends; the standby takes over. The old token
	// names nobody any more, whatever pid the new lock session has.
	stale := first.token
	first.release()
	testenv.Eventually(t, 10*time.Second, func() bool {
		ok, err := standby.tryAcquire(ctx)
		require.NoError(t, err)
		return ok
	}, "the standby takes over")
	defer standby.release()
	require.True(t, fence(standby.token), "the new leader passes its fence")
	require.False(t, fence(stale), "the old leader's fence fails")
}
