package poller

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
)

// ErrNoSession is returned by CheckSession when a connection of the pool
// does not keep one PostgreSQL session from one statement to the next: a
// pooler in transaction or statement mode (PgBouncer's pool_mode =
// transaction) hands each transaction whichever server connection is free.
// The publisher cannot run there: its leader lock and sleep lock are
// session advisory locks, its wake-ups come by LISTEN and its claims use
// prepared statements, all of which belong to one session. Leadership
// would be held by a server connection other clients then borrow, and
// NOTIFYs would reach whichever client happens to be on the listening one.
var ErrNoSession = errors.New("database connections do not keep their session between transactions (a pooler in transaction or statement mode)")

// sessionProbe is the custom setting CheckSession sets on a session.
const sessionProbe = "pgnats_outbox.session_probe"

// sessionRounds is how many times CheckSession tries to catch a pooler
// moving a session: a round that catches it is conclusive; one that does
// not may have been lucky (the pooler gave the same server connection).
const sessionRounds = 3

// CheckSession reports whether connections of db keep their PostgreSQL
// session, as a direct connection or a pooler in session mode does. It
// returns an error wrapping ErrNoSession when they do not, or the error of
// a statement that failed (a pooler in statement mode refuses the
// transaction it opens). It uses two connections of db at once, returned
// to it when done, and leaves nothing behind: a custom setting on a
// server session, which is no one's concern.
//
// How: client connection A sets a setting on its session and notes its
// backend pid; connection B opens a transaction, which pins a server
// connection, and reads its pid and the setting; A then reads its pid and
// the setting again. With sessions kept, A keeps its pid and setting and B
// has neither. Through a transaction pooler, B is given A's idle server
// connection (pid and setting), or A, whose server connection went back to
// the pool after each statement, comes back on another one. Comparing
// pg_backend_pid() alone would miss the pooler whose pool holds one server
// connection, and the setting alone one that moves only the setting's
// reader; each is checked.
func CheckSession(ctx context.Context, db *sql.DB) error {
	a, err := db.Conn(ctx)
	if err != nil {
		return fmt.Errorf("check session: %w", err)
	}
	defer a.Close()
	b, err := db.Conn(ctx)
	if err != nil {
		return fmt.Errorf("check session: %w", err)
	}
	defer b.Close()
	for range sessionRounds {
		if err := sessionRound(ctx, a, b); err != nil {
			return err
		}
	}
	return nil
}

// readProbe reads the session's backend pid and its probe setting.
const readProbe = `SELECT pg_backend_pid(), current_setting('` + sessionProbe + `', true)`

// sessionRound is one round of CheckSession's probe.
func sessionRound(ctx context.Context, a, b *sql.Conn) error {
	buf := make([]byte, 8)
	_, _ = rand.Read(buf)
	token := hex.EncodeToString(buf)
	var pidA int
	// Statements without parameters: lib/pq sends them in one message, so
	// a pooler cannot split one between two server connections (a
	// parameterised one is parsed, then bound and run, in two).
	if err := a.QueryRowContext(ctx, `SELECT pg_backend_pid() FROM (SELECT set_config('`+sessionProbe+`', '`+token+`', false)) s`).
		Scan(&pidA); err != nil {
		return fmt.Errorf("check session: set a session setting: %w", err)
	}
	tx, err := b.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("check session: open a transaction: %w", err)
	}
	defer tx.Rollback() //nolint:errcheck // read only
	var (
		pidB   int
		seenB  sql.NullString
		pidA2  int
		seenA2 sql.NullString
	)
	if err := tx.QueryRowContext(ctx, readProbe).Scan(&pidB, &seenB); err != nil {
		return fmt.Errorf("check session: read from a second connection: %w", err)
	}
	// B's transaction is still open here: its server connection is not
	// free for A.
	if err := a.QueryRowContext(ctx, readProbe).Scan(&pidA2, &seenA2); err != nil {
		return fmt.Errorf("check session: read the session setting back: %w", err)
	}
	switch {
	case pidB == pidA || seenB.String == token:
		return fmt.Errorf("%w: two client connections were given the same server session (backend pid %d)", ErrNoSession, pidA)
	case pidA2 != pidA || seenA2.String != token:
		return fmt.Errorf("%w: a client connection moved from backend pid %d to %d between two statements", ErrNoSession, pidA, pidA2)
	}
	return tx.Rollback()
}
