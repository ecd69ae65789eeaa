package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"regexp"
	"time"

	"github.com/lib/pq"
	"github.com/nats-io/nats.go"
)

// Defaults for local development.
const (
	defaultDatabaseURL = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
	defaultNATSURL     = nats.DefaultURL
)

// common holds the flags every database command shares.
type common struct {
	databaseURL string
	table       string
	logFormat   string
	logLevel    string
}

func (o *common) register(c *command) {
	c.String(&o.databaseURL, "database-url", defaultDatabaseURL,
		"PostgreSQL connection URL or key=value DSN; connect directly, not through a transaction-mode pooler", "DATABASE_URL")
	c.String(&o.table, "table", "events", "events table, optionally schema-qualified (schema.events)")
	c.String(&o.logFormat, "log-format", "text", "log format: text or json")
	c.String(&o.logLevel, "log-level", "info", "log level: debug, info, warn or error")
}

func (o *common) logger(w io.Writer) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(o.logLevel)); err != nil {
		return nil, usagef("--log-level %q: use debug, info, warn or error", o.logLevel)
	}
	opts := &slog.HandlerOptions{Level: level}
	switch o.logFormat {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, usagef("--log-format %q: use text or json", o.logFormat)
}

// openDB connects to PostgreSQL and checks that it answers.
func openDB(ctx context.Context, dsn string) (*sql.DB, error) {
	db, err := sql.Open("postgres", dsn)
	if err != nil {
		return nil, fmt.Errorf("database URL %s: %w", redact(dsn), err)
	}
	if err := pingDB(ctx, db, dsn); err != nil {
		db.Close()
		return nil, err
	}
	return db, nil
}

func pingDB(ctx context.Context, db *sql.DB, dsn string) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	err := db.PingContext(ctx)
	var pqErr *pq.Error
	switch {
	case err == nil:
		return nil
	case errors.As(err, &pqErr):
		// The server answered: the address is right, the login is not.
		return fmt.Errorf("PostgreSQL at %s refused the connection: %w\n"+
			"  check the user, password and database name in --database-url (or DATABASE_URL)", redact(dsn), err)
	}
	return fmt.Errorf("PostgreSQL is unreachable at %s: %w\n"+
		"  start PostgreSQL there, or point --database-url (or DATABASE_URL) at a running server", redact(dsn), err)
}

var passwordKV = regexp.MustCompile(`(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)`)

// redact hides the password of a URL or key=value DSN, for messages and
// logs.
func redact(dsn string) string {
	if u, err := url.Parse(dsn); err == nil && u.Scheme != "" {
		q := u.Query()
		if q.Has("password") {
			q.Set("password", "xxxxx")
			u.RawQuery = q.Encode()
		}
		return u.Redacted()
	}
	return passwordKV.ReplaceAllString(dsn, "${1}xxxxx")
}

// connectNATS connects to NATS. With wait, a server that is down is retried
// in the background (the publisher backs off until it returns); without,
// an unreachable server is an error. onReconnect (if not nil) is called on
// each reconnection.
func connectNATS(natsURL string, wait bool, log *slog.Logger, onReconnect func()) (*nats.Conn, error) {
	shown := redact(natsURL)
	nc, err := nats.Connect(natsURL,
		nats.Name("pgnats-outbox publisher"),
		nats.RetryOnFailedConnect(wait),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250*time.Millisecond),
		// Fail publishes while disconnected instead of buffering them:
		// buffered messages would overtake earlier ones lost in the
		// disconnect and reorder an entity's events.
		nats.ReconnectBufSize(-1),
		nats.DisconnectErrHandler(func(c *nats.Conn, err error) {
			if c.IsClosed() {
				return // our own Close at shutdown
			}
			log.Warn("NATS disconnected; reconnecting", "url", shown, "err", err)
		}),
		nats.ReconnectHandler(func(c *nats.Conn) {
			if onReconnect != nil {
				onReconnect()
			}
			log.Info("NATS reconnected", "url", redact(c.ConnectedUrl()))
		}),
		// With wait, the first connection may come after Connect returned.
		nats.ConnectHandler(func(c *nats.Conn) {
			log.Info("NATS connected", "url", redact(c.ConnectedUrl()))
		}),
	)
	if err != nil {
		return nil, fmt.Errorf("NATS is unreachable at %s: %w\n"+
			"  start nats-server with JetStream (nats-server -js), or point --nats-url (or NATS_URL) at one", shown, err)
	}
	if !nc.IsConnected() {
		log.Warn("NATS unreachable; retrying in the background", "url", shown,
			"fix", "start nats-server with JetStream (nats-server -js), or point --nats-url (or NATS_URL) at one")
	}
	return nc, nil
}
