package poller

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
)

// TestCheckSessionDirect: connections straight to PostgreSQL keep their
// session, even from a pool of many; CheckSession must not refuse them.
// (A pooler in transaction mode is refused in integration/pgbouncer_test.go.)
func TestCheckSessionDirect(t *testing.T) {
	t.Parallel()
	db := testenv.NewDB(t)
	for range 5 {
		require.NoError(t, CheckSession(context.Background(), db.DB.DB))
	}
	// A pool that cannot hand out a second connection fails, saying so,
	// rather than waiting forever or passing.
	db.DB.SetMaxOpenConns(1)
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	require.ErrorIs(t, CheckSession(ctx, db.DB.DB), context.DeadlineExceeded)
}
