package main

import (
	"cmp"
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"strings"
	"sync"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/pkg/outbox"
)

// scenario is what the demo does and what must come of it.
type scenario struct {
	customers []customerSpec
	orders    []orderSpec // created in this order
}

type customerSpec struct {
	id    string
	limit int64
}

type orderSpec struct {
	id       string
	customer string
	amount   int64
	want     string // APPROVED or REJECTED
}

// creditLimitSaga has orders that fit their customer's credit limit and
// orders that exceed it. The customer service handles OrderCreated events
// in the order they were written, so each outcome is determined.
func creditLimitSaga() scenario {
	return scenario{
		customers: []customerSpec{{"alice", 100}, {"bob", 50}},
		orders: []orderSpec{
			{"o-1", "alice", 30, approved}, // alice: 30 of 100 reserved
			{"o-2", "alice", 50, approved}, // 80 of 100
			{"o-3", "alice", 40, rejected}, // 80+40 > 100
			{"o-4", "bob", 60, rejected},   // 60 > 50
			{"o-5", "bob", 20, approved},   // 20 of 50
		},
	}
}

// wantReserved returns each customer's credit reserved by the approved
// orders.
func (s scenario) wantReserved() map[string]int64 {
	r := map[string]int64{}
	for _, c := range s.customers {
		r[c.id] = 0
	}
	for _, o := range s.orders {
		if o.want == approved {
			r[o.customer] += o.amount
		}
	}
	return r
}

func (s scenario) want(status string) int {
	n := 0
	for _, o := range s.orders {
		if o.want == status {
			n++
		}
	}
	return n
}

// sagaConfig is what runSaga runs against.
type sagaConfig struct {
	DSN     string
	NATS    *nats.Conn
	Timeout time.Duration // for the saga to finish, from its start
	Out     io.Writer     // progress and the report
	Stderr  io.Writer     // warnings of the publishers and consumers
}

// saga is the running demo: two services, each with its own outbox,
// publisher and dedup consumer, on one stream.
type saga struct {
	cfg       sagaConfig
	sc        scenario
	subjects  subjects
	orders    *orderService
	customers *customerService
	js        jetstream.JetStream
	stream    jetstream.Stream
	pubs      *publishers

	customerConsumer, orderConsumer *dedupConsumer
	customerJS                      jetstream.Consumer // to see what it acked
}

// runSaga sets the saga up in schemas, a stream and consumers of its own,
// plays sc, and removes everything it set up, also on failure. It returns
// an error if anything did not happen as it must.
func runSaga(ctx context.Context, cfg sagaConfig, sc scenario) (err error) {
	sfx := suffix()
	s := &saga{cfg: cfg, sc: sc, subjects: subjects{prefix: "demo" + sfx}}
	// Cleanup runs even when ctx is cancelled or its deadline passed.
	cleanup := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	}
	log := slog.New(slog.NewTextHandler(cfg.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

	db, err := sqlx.Open("postgres", cfg.DSN)
	if err != nil {
		return err
	}
	defer db.Close()
	ordersSchema, customersSchema := "demo_"+sfx+"_orders", "demo_"+sfx+"_customers"
	defer func() {
		ctx, cancel := cleanup()
		defer cancel()
		for _, name := range []string{ordersSchema, customersSchema} {
			if _, dropErr := db.ExecContext(ctx, `DROP SCHEMA IF EXISTS `+pq.QuoteIdentifier(name)+` CASCADE`); dropErr != nil {
				err = errors.Join(err, fmt.Errorf("drop schema %s: %w", name, dropErr))
			}
		}
	}()
	if s.orders, err = newOrderService(ctx, db, ordersSchema, s.subjects); err != nil {
		return fmt.Errorf("order service: %w", err)
	}
	if s.customers, err = newCustomerService(ctx, db, customersSchema, s.subjects); err != nil {
		return fmt.Errorf("customer service: %w", err)
	}
	for _, c := range sc.customers {
		if err := s.customers.AddCustomer(ctx, c.id, c.limit); err != nil {
			return fmt.Errorf("customer service: %w", err)
		}
	}

	if s.js, err = jetstream.New(cfg.NATS); err != nil {
		return err
	}
	s.stream, err = s.js.CreateStream(ctx, jetstream.StreamConfig{
		Name:       "DEMO_" + strings.ToUpper(sfx),
		Subjects:   []string{s.subjects.prefix + ".>"},
		Storage:    jetstream.MemoryStorage,
		Duplicates: 2 * time.Minute,
	})
	if err != nil {
		return fmt.Errorf("create stream: %w", err)
	}
	streamName := s.stream.CachedInfo().Config.Name
	defer func() {
		ctx, cancel := cleanup()
		defer cancel()
		if delErr := s.js.DeleteStream(ctx, streamName); delErr != nil {
			err = errors.Join(err, fmt.Errorf("delete stream %s: %w", streamName, delErr))
		}
	}()
	fmt.Fprintf(cfg.Out, "order service: schema %s; customer service: schema %s; stream %s on %s.>\n",
		ordersSchema, customersSchema, streamName, s.subjects.prefix)

	// One publisher per outbox: the real publish loop, in process.
	if s.pubs, err = startPublishers(ctx, cfg, ordersSchema+".events", customersSchema+".events"); err != nil {
		return err
	}
	defer s.pubs.Stop()

	s.customerConsumer = &dedupConsumer{name: "customer-service", proc: s.customers.dedup, fn: s.customers.HandleOrderCreated,
		log: log, retry: 500 * time.Millisecond}
	s.customerJS, err = consume(ctx, s.js, streamName, s.subjects.of("order", orderCreated), s.customerConsumer)
	if err != nil {
		return fmt.Errorf("customer service: %w", err)
	}
	defer s.customerConsumer.Stop()
	s.orderConsumer = &dedupConsumer{name: "order-service", proc: s.orders.dedup, fn: s.orders.HandleCreditEvent,
		log: log, retry: 500 * time.Millisecond}
	if _, err = consume(ctx, s.js, streamName, s.subjects.prefix+".customer.>", s.orderConsumer); err != nil {
		return fmt.Errorf("order service: %w", err)
	}
	defer s.orderConsumer.Stop()

	return s.play(ctx)
}

// play creates the orders, waits for the saga to decide them, injects a
// duplicate delivery, and reports. Its waits end at the --timeout deadline.
func (s *saga) play(ctx context.Context) error {
	for _, o := range s.sc.orders {
		if err := s.orders.CreateOrder(ctx, o.id, o.customer, o.amount); err != nil {
			return fmt.Errorf("order service: %w", err)
		}
	}
	fmt.Fprintf(s.cfg.Out, "order service: created %d orders (PENDING), each with its %s event in the same transaction\n",
		len(s.sc.orders), orderCreated)

	wctx, cancel := context.WithTimeoutCause(ctx, s.cfg.Timeout, fmt.Errorf("--timeout %s passed", s.cfg.Timeout))
	defer cancel()
	if err := s.waitUntil(wctx, "every order to be approved or rejected", s.ordersDecided); err != nil {
		return err
	}

	// A redelivery that JetStream's own deduplication cannot catch: the
	// same event under another Nats-Msg-Id, as a replay or a second
	// publisher after the duplicate window would send it.
	entity, seq, err := injectDuplicate(ctx, s.js, s.stream, s.subjects.of("order", orderCreated))
	if err != nil {
		return fmt.Errorf("inject duplicate: %w", err)
	}
	fmt.Fprintf(s.cfg.Out, "injected a duplicate delivery: %s of order %s again, same %s, new %s\n",
		orderCreated, entity, outbox.HeaderEventID, outbox.HeaderMsgID)
	err = s.waitUntil(wctx, "the customer service to handle the duplicate", func(ctx context.Context) (bool, string, error) {
		info, err := s.customerJS.Info(ctx)
		if err != nil {
			return false, "", err
		}
		return info.AckFloor.Stream >= seq, fmt.Sprintf("customer service acked the stream up to message %d; the duplicate is message %d",
			info.AckFloor.Stream, seq), nil
	})
	if err != nil {
		return err
	}

	var written int
	err = s.waitUntil(wctx, "every event to be published", func(ctx context.Context) (bool, string, error) {
		var success int
		written = 0
		for _, st := range []*store{s.orders.store, s.customers.store} {
			w, p, err := st.eventCounts(ctx)
			if err != nil {
				return false, "", err
			}
			written, success = written+w, success+p
		}
		published := s.pubs.Published()
		return success == written && published >= int64(written),
			fmt.Sprintf("events written %d, published %d", written, published), nil
	})
	if err != nil {
		return err
	}

	got, err := s.orders.Orders(ctx)
	if err != nil {
		return err
	}
	reserved, err := s.customers.Reserved(ctx)
	if err != nil {
		return err
	}
	return report(s.cfg.Out, s.sc, result{
		orders:     got,
		reserved:   reserved,
		written:    int64(written),
		published:  s.pubs.Published(),
		duplicates: s.customerConsumer.duplicates.Load() + s.orderConsumer.duplicates.Load(),
		processed: map[string]int64{
			s.customerConsumer.name: s.customerConsumer.processed.Load(),
			s.orderConsumer.name:    s.orderConsumer.processed.Load(),
		},
	})
}

// ordersDecided reports whether no order is PENDING any more.
func (s *saga) ordersDecided(ctx context.Context) (bool, string, error) {
	got, err := s.orders.Orders(ctx)
	if err != nil {
		return false, "", err
	}
	n := map[string]int{}
	for _, o := range got {
		n[o.Status]++
	}
	return n[pending] == 0, fmt.Sprintf("orders decided %d of %d (%d approved, %d rejected); events published %d",
		n[approved]+n[rejected], len(got), n[approved], n[rejected], s.pubs.Published()), nil
}

// waitUntil calls check every 50ms until it reports done, printing each new
// status line, and fails when a publisher fails or ctx ends (the
// --timeout deadline).
func (s *saga) waitUntil(ctx context.Context, what string, check func(context.Context) (bool, string, error)) error {
	var last string
	for {
		if err := s.pubs.Err(); err != nil {
			return err
		}
		done, status, err := check(ctx)
		if err != nil && ctx.Err() == nil {
			return fmt.Errorf("wait for %s: %w", what, err)
		}
		if status != "" && status != last {
			fmt.Fprintf(s.cfg.Out, "  %s\n", status)
			last = status
		}
		if done && err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("gave up waiting for %s: %w (last seen: %s)", what, context.Cause(ctx), cmp.Or(last, "nothing"))
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// suffix returns a short random lowercase hex string for unique names.
func suffix() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// publishers runs one poller per events table until Stop.
type publishers struct {
	db      *sql.DB
	pollers []*poller.Poller
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	level   slog.LevelVar // of the pollers' logs

	mu  sync.Mutex
	err error // setup failures returned by Run
}

// startPublishers starts a poller for each events table, logging warnings
// to cfg.Stderr.
func startPublishers(ctx context.Context, cfg sagaConfig, tables ...string) (*publishers, error) {
	db, err := sql.Open("postgres", cfg.DSN)
	if err != nil {
		return nil, err
	}
	p := &publishers{db: db}
	p.level.Set(slog.LevelWarn)
	log := slog.New(slog.NewTextHandler(cfg.Stderr, &slog.HandlerOptions{Level: &p.level}))
	for _, table := range tables {
		pl, err := poller.New(poller.Config{
			DB: db, DSN: cfg.DSN, NATS: cfg.NATS, Table: table,
			BackoffMax: time.Second, // the demo is short: retry soon
			Logger:     log.With("publisher", table),
		})
		if err != nil {
			db.Close()
			return nil, fmt.Errorf("publisher of %s: %w", table, err)
		}
		p.pollers = append(p.pollers, pl)
	}
	ctx, p.cancel = context.WithCancel(ctx)
	for i, pl := range p.pollers {
		p.wg.Go(func() {
			if err := pl.Run(ctx); err != nil {
				p.mu.Lock()
				p.err = errors.Join(p.err, fmt.Errorf("publisher of %s: %w", tables[i], err))
				p.mu.Unlock()
			}
		})
	}
	return p, nil
}

// Published returns how many events the publishers have published.
func (p *publishers) Published() int64 {
	var n int64
	for _, pl := range p.pollers {
		n += pl.Stats().Published
	}
	return n
}

// Err returns the setup failures of the publishers so far.
func (p *publishers) Err() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// Stop stops the publishers and waits for them.
func (p *publishers) Stop() {
	// A poller stopped in the middle of a claim logs it as an outage
	// ("publish loop backing off ... context canceled"): noise once the
	// demo is over, so only errors are shown from here on.
	p.level.Set(slog.LevelError)
	p.cancel()
	p.wg.Wait()
	p.db.Close()
}

// injectDuplicate publishes again the first message stored on subject,
// with the same headers but a new Nats-Msg-Id so that JetStream stores it.
// It returns the message's entity id and the copy's stream sequence.
func injectDuplicate(ctx context.Context, js jetstream.JetStream, stream jetstream.Stream, subject string) (string, uint64, error) {
	orig, err := stream.GetMsg(ctx, 1, jetstream.WithGetMsgSubject(subject))
	if err != nil {
		return "", 0, fmt.Errorf("read the first message on %s: %w", subject, err)
	}
	msg := nats.NewMsg(subject)
	msg.Data = orig.Data
	msg.Header = maps.Clone(orig.Header)
	msg.Header.Set(outbox.HeaderMsgID, orig.Header.Get(outbox.HeaderMsgID)+"-again")
	ack, err := js.PublishMsg(ctx, msg)
	if err != nil {
		return "", 0, err
	}
	if ack.Duplicate {
		return "", 0, errors.New("JetStream dropped the copy as a duplicate")
	}
	return orig.Header.Get(outbox.HeaderEntityID), ack.Sequence, nil
}
