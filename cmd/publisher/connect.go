package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/lib/pq"
	"github.com/nats-io/nats.go"

	"github.com/pgnats/outbox/internal/redact"
	"github.com/pgnats/outbox/internal/wire"
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
	if err := checkDSN(dsn); err != nil {
		return nil, err
	}
	db, err := sql.Open("postgres", dsn)
	if err != nil {
		return nil, fmt.Errorf("database URL %s: %w", redact.DSN(dsn), err)
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
			"  check the user, password and database name in --database-url (or DATABASE_URL)", redact.DSN(dsn), err)
	}
	return fmt.Errorf("PostgreSQL is unreachable at %s: %w\n"+
		"  start PostgreSQL there, or point --database-url (or DATABASE_URL) at a running server", redact.DSN(dsn), err)
}

// escapeHint says how to write a password in a URL.
const escapeHint = "\n  percent-encode the password's special characters (% as %25, # as %23, @ as %40, / as %2F, ? as %3F, : as %3A)"

// checkNATSURLs reports, as a usage error, a list of NATS URLs of which
// one is not a URL nats.go reads as written (see checkDSN for why the
// parser's message is not shown).
func checkNATSURLs(cmd, urls string) error {
	for _, s := range strings.Split(urls, ",") {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if !strings.Contains(s, "://") {
			s = "nats://" + s // as nats.go reads host:port
		}
		u, err := url.Parse(s)
		if err != nil || strings.Contains(s, "#") || u.User == nil && strings.Contains(s, "@") ||
			strings.Count(s, "@") > 1 {
			return usagef("%s: --nats-url %s is not a valid list of URLs%s", cmd, redact.NATS(urls), escapeHint)
		}
	}
	return nil
}

// checkDSN reports, as a usage error, a database URL or key=value DSN that
// lib/pq would misread or refuse. Its message shows the DSN redacted and
// none of the parser's own text, which quotes the DSN up to where it went
// wrong: a password with an unescaped '#' is cut there, and what is shown
// of it would escape redaction.
func checkDSN(dsn string) error {
	const fix = escapeHint + ", or give key=value pairs with the password in single quotes (password='...')"
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		u, err := url.Parse(dsn)
		_, afterUser, _ := strings.Cut(dsn[strings.Index(dsn, "://")+3:], "@")
		switch {
		case err != nil, strings.Contains(dsn, "#"), u.User == nil && strings.Contains(dsn, "@"),
			u.User != nil && strings.Contains(afterUser, "@"):
			return usagef("--database-url %s is not a valid URL%s", redact.DSN(dsn), fix)
		}
	}
	if _, err := pq.NewConnector(dsn); err != nil {
		return usagef("--database-url %s is neither a postgres:// URL nor key=value pairs%s", redact.DSN(dsn), fix)
	}
	return nil
}

// natsOptions holds the flags of every command that connects to NATS: the
// server address, how to authenticate, and TLS. Each secret can come from
// the environment (OUTBOX_NATS_PASSWORD, OUTBOX_NATS_TOKEN) instead of the
// command line, which other users of the host can read.
type natsOptions struct {
	url                    string
	user, password, token  string
	nkeyFile, credsFile    string
	tlsCA, tlsCert, tlsKey string
	// maxControlLine is the server's max_control_line, which its INFO
	// does not announce.
	maxControlLine int
}

func (o *natsOptions) register(c *command, urlHelp string) {
	c.String(&o.url, "nats-url", defaultNATSURL, urlHelp, "NATS_URL")
	c.String(&o.user, "nats-user", "", "NATS user name, with --nats-password")
	c.String(&o.password, "nats-password", "", "NATS password of --nats-user (prefer the environment to the command line)")
	c.String(&o.token, "nats-token", "", "NATS authentication token (prefer the environment to the command line)")
	c.String(&o.nkeyFile, "nats-nkey", "", "file holding the NATS user's nkey seed (SU...)")
	c.String(&o.credsFile, "nats-creds", "", "NATS credentials file: user JWT and nkey seed, as nsc writes it")
	c.String(&o.tlsCA, "nats-tls-ca", "", "PEM file of the CA certificates the NATS server's certificate must chain to; TLS is then required")
	c.String(&o.tlsCert, "nats-tls-cert", "", "PEM client certificate for NATS mutual TLS, with --nats-tls-key; TLS is then required")
	c.String(&o.tlsKey, "nats-tls-key", "", "PEM private key of --nats-tls-cert")
	c.Int(&o.maxControlLine, "nats-max-control-line", wire.DefaultMaxControlLine,
		"the NATS server's max_control_line in bytes (its INFO does not say): an event whose protocol line is longer is FAILED, not sent")
}

// check reports contradictory or incomplete NATS flags, as a usage error.
func (o *natsOptions) check(cmd string) error {
	if err := checkNATSURLs(cmd, o.url); err != nil {
		return err
	}
	if o.maxControlLine < minControlLine {
		return usagef("%s: --nats-max-control-line %d is below %d bytes, less than any message of the outbox needs", cmd, o.maxControlLine, minControlLine)
	}
	var ways []string
	if o.user != "" || o.password != "" {
		ways = append(ways, "--nats-user/--nats-password")
	}
	for _, f := range []struct{ flag, value string }{
		{"--nats-token", o.token}, {"--nats-nkey", o.nkeyFile}, {"--nats-creds", o.credsFile},
	} {
		if f.value != "" {
			ways = append(ways, f.flag)
		}
	}
	if len(ways) > 1 {
		return usagef("%s: %s are alternatives: give one way to authenticate to NATS", cmd, strings.Join(ways, " and "))
	}
	if (o.user == "") != (o.password == "") {
		return usagef("%s: --nats-user and --nats-password go together", cmd)
	}
	if (o.tlsCert == "") != (o.tlsKey == "") {
		return usagef("%s: --nats-tls-cert and --nats-tls-key go together", cmd)
	}
	if len(ways) > 0 {
		for _, s := range strings.Split(o.url, ",") {
			if u, err := url.Parse(strings.TrimSpace(s)); err == nil && u.User != nil {
				return usagef("%s: --nats-url %s holds credentials and %s gives others: give one", cmd, redact.NATS(o.url), ways[0])
			}
		}
	}
	return nil
}

// options turns the flags into nats.go options. A file that cannot be read
// or holds no usable key or certificate is an error: TLS or authentication
// asked for is never silently dropped.
func (o *natsOptions) options() ([]nats.Option, error) {
	var opts []nats.Option
	switch {
	case o.user != "":
		opts = append(opts, nats.UserInfo(o.user, o.password))
	case o.token != "":
		opts = append(opts, nats.Token(o.token))
	case o.nkeyFile != "":
		opt, err := nats.NkeyOptionFromSeed(o.nkeyFile)
		if err != nil {
			return nil, fmt.Errorf("--nats-nkey %s: %w", o.nkeyFile, err)
		}
		opts = append(opts, opt)
	case o.credsFile != "":
		// nats.go reads the file at each connection; read it once now so
		// a wrong path fails at start.
		if _, err := os.Stat(o.credsFile); err != nil {
			return nil, fmt.Errorf("--nats-creds: %w", err)
		}
		opts = append(opts, nats.UserCredentials(o.credsFile))
	}
	if o.tlsCA == "" && o.tlsCert == "" {
		return opts, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if o.tlsCA != "" {
		pem, err := os.ReadFile(o.tlsCA)
		if err != nil {
			return nil, fmt.Errorf("--nats-tls-ca: %w", err)
		}
		cfg.RootCAs = x509.NewCertPool()
		if !cfg.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--nats-tls-ca %s: no PEM certificate in the file", o.tlsCA)
		}
	}
	if o.tlsCert != "" {
		cert, err := tls.LoadX509KeyPair(o.tlsCert, o.tlsKey)
		if err != nil {
			return nil, fmt.Errorf("--nats-tls-cert %s, --nats-tls-key %s: %w", o.tlsCert, o.tlsKey, err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return append(opts, nats.Secure(cfg)), nil
}

// minControlLine is the least --nats-max-control-line accepted: the
// protocol line of a one-byte subject with the reply subject and sizes.
const minControlLine = 128

// env returns the NATS settings as OUTBOX_ environment variables (URL
// excepted), for a child publisher: secrets stay off its command line.
func (o *natsOptions) env() []string {
	var env []string
	for name, v := range map[string]string{
		"nats-user": o.user, "nats-password": o.password, "nats-token": o.token,
		"nats-nkey": o.nkeyFile, "nats-creds": o.credsFile,
		"nats-tls-ca": o.tlsCA, "nats-tls-cert": o.tlsCert, "nats-tls-key": o.tlsKey,
	} {
		if v != "" {
			env = append(env, envName(name)+"="+v)
		}
	}
	if o.maxControlLine != wire.DefaultMaxControlLine {
		env = append(env, envName("nats-max-control-line")+"="+strconv.Itoa(o.maxControlLine))
	}
	return env
}

// permanentNATSError reports whether a failed connection will fail the
// same way on every retry: refused credentials, or TLS that cannot be set
// up. Waiting would hide a configuration error, so it is reported instead.
func permanentNATSError(err error) bool {
	for _, e := range []error{nats.ErrAuthorization, nats.ErrAuthExpired, nats.ErrAuthRevoked,
		nats.ErrAccountAuthExpired, nats.ErrSecureConnWanted, nats.ErrSecureConnRequired, nats.ErrNkeysNotSupported} {
		if errors.Is(err, e) {
			return true
		}
	}
	var (
		verify  *tls.CertificateVerificationError
		alert   tls.AlertError
		unknown x509.UnknownAuthorityError
		host    x509.HostnameError
		invalid x509.CertificateInvalidError
		record  tls.RecordHeaderError
	)
	return errors.As(err, &verify) || errors.As(err, &alert) || errors.As(err, &unknown) ||
		errors.As(err, &host) || errors.As(err, &invalid) || errors.As(err, &record) ||
		strings.Contains(err.Error(), "tls: ")
}

// connectNATS connects to NATS with o's address, credentials and TLS.
// With wait, a server that is down is retried in the background (the
// publisher backs off until it returns); without, an unreachable server is
// an error. Either way a server that refuses the credentials or the TLS
// setup is an error at once. onReconnect (if not nil) is called on each
// reconnection.
func connectNATS(o natsOptions, wait bool, log *slog.Logger, onReconnect func()) (*nats.Conn, error) {
	auth, err := o.options()
	if err != nil {
		return nil, err
	}
	shown := redact.NATS(o.url)
	opts := append([]nats.Option{
		nats.Name("pgnats-outbox publisher"),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250 * time.Millisecond),
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
			log.Info("NATS reconnected", "url", redact.NATS(c.ConnectedUrl()))
		}),
		// With wait, the first connection may come after Connect returned.
		nats.ConnectHandler(func(c *nats.Conn) {
			log.Info("NATS connected", "url", redact.NATS(c.ConnectedUrl()))
		}),
	}, auth...)
	// One attempt first, so that refused credentials or a TLS mismatch
	// fail now rather than in an endless background retry.
	nc, err := nats.Connect(o.url, opts...)
	if err != nil && wait && !permanentNATSError(err) {
		nc, err = nats.Connect(o.url, append(opts, nats.RetryOnFailedConnect(true))...)
	}
	if err != nil {
		return nil, natsConnectError(shown, err)
	}
	if !nc.IsConnected() {
		log.Warn("NATS unreachable; retrying in the background", "url", shown,
			"fix", "start nats-server with JetStream (nats-server -js), or point --nats-url (or NATS_URL) at one")
	}
	return nc, nil
}

// natsConnectError explains a failed connection, by its cause.
func natsConnectError(shown string, err error) error {
	switch {
	case errors.Is(err, nats.ErrAuthorization), errors.Is(err, nats.ErrAuthExpired), errors.Is(err, nats.ErrAuthRevoked),
		errors.Is(err, nats.ErrAccountAuthExpired), errors.Is(err, nats.ErrNkeysNotSupported):
		return fmt.Errorf("NATS at %s refused the credentials: %w\n"+
			"  check --nats-user/--nats-password, --nats-token, --nats-nkey or --nats-creds (or their OUTBOX_ variables)", shown, err)
	case errors.Is(err, nats.ErrSecureConnWanted):
		return fmt.Errorf("NATS at %s does not offer TLS, which --nats-tls-ca or --nats-tls-cert require: %w\n"+
			"  enable TLS on the server, or point --nats-url at one that has it", shown, err)
	case permanentNATSError(err):
		return fmt.Errorf("TLS with NATS at %s failed: %w\n"+
			"  check --nats-tls-ca (the CA that signed the server's certificate, for the host in --nats-url) "+
			"and --nats-tls-cert/--nats-tls-key (a client certificate the server trusts)", shown, err)
	}
	return fmt.Errorf("NATS is unreachable at %s: %w\n"+
		"  start nats-server with JetStream (nats-server -js), or point --nats-url (or NATS_URL) at one", shown, err)
}
