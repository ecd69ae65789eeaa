package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgnats/outbox/pkg/dedup"
	"github.com/pgnats/outbox/pkg/outbox"
	"github.com/pgnats/outbox/schema"
)

// Order statuses.
const (
	pending  = "PENDING"
	approved = "APPROVED"
	rejected = "REJECTED"
)

// Event types of the saga.
const (
	orderCreated        = "OrderCreated"
	creditReserved      = "CreditReserved"
	creditLimitExceeded = "CreditLimitExceeded"
)

// subjects are the NATS subjects of the saga's events, under a prefix of
// their own.
type subjects struct {
	prefix string // "demo<suffix>": every subject starts with it
}

func (s subjects) of(entityType, eventType string) string {
	return s.prefix + "." + entityType + "." + eventType
}

// orderCreatedEvent is the payload of OrderCreated.
type orderCreatedEvent struct {
	OrderID    string `json:"order_id"`
	CustomerID string `json:"customer_id"`
	Amount     int64  `json:"amount"`
}

// creditEvent is the payload of CreditReserved and CreditLimitExceeded.
type creditEvent struct {
	OrderID        string `json:"order_id"`
	CustomerID     string `json:"customer_id"`
	Amount         int64  `json:"amount"`
	CreditLimit    int64  `json:"credit_limit"`
	CreditReserved int64  `json:"credit_reserved"` // after this order
}

// store is one service's own tables, in a Postgres schema of its own: its
// business tables, its outbox (events) and its processed-message table.
// Two real services would have two databases; two schemas of one database
// keep the demo to one server while sharing nothing.
type store struct {
	db     *sqlx.DB
	schema string
	outbox *outbox.Writer
	dedup  *dedup.Processor
}

// newStore creates the schema with the given business tables and migrates
// the outbox tables into it.
func newStore(ctx context.Context, db *sqlx.DB, schemaName string, ddl ...string) (*store, error) {
	tables := schema.Tables{Events: schemaName + ".events", Processed: schemaName + ".processed_message"}
	if _, err := db.ExecContext(ctx, `CREATE SCHEMA `+pq.QuoteIdentifier(schemaName)); err != nil {
		return nil, fmt.Errorf("create schema %s: %w", schemaName, err)
	}
	for _, stmt := range ddl {
		if _, err := db.ExecContext(ctx, fmt.Sprintf(stmt, pq.QuoteIdentifier(schemaName))); err != nil {
			return nil, fmt.Errorf("create tables in %s: %w", schemaName, err)
		}
	}
	if _, err := schema.Migrate(ctx, db.DB, tables); err != nil {
		return nil, fmt.Errorf("migrate outbox tables in %s: %w", schemaName, err)
	}
	w, err := outbox.NewWriter(outbox.Config{Table: tables.Events})
	if err != nil {
		return nil, err
	}
	p, err := dedup.New(db, dedup.Config{Table: tables.Processed})
	if err != nil {
		return nil, err
	}
	return &store{db: db, schema: schemaName, outbox: w, dedup: p}, nil
}

// table returns the quoted, schema-qualified name of one of the store's
// tables.
func (s *store) table(name string) string {
	return pq.QuoteIdentifier(s.schema) + "." + pq.QuoteIdentifier(name)
}

// eventCounts returns how many events the store's outbox holds, and how
// many of them are published (SUCCESS).
func (s *store) eventCounts(ctx context.Context) (written, published int, err error) {
	err = s.db.QueryRowContext(ctx, `SELECT count(*), count(*) FILTER (WHERE event_status = 'SUCCESS') FROM `+s.table("events")).
		Scan(&written, &published)
	return written, published, err
}

// orderService owns the orders. It creates an order (PENDING) together
// with its OrderCreated event, and approves or rejects it when the
// customer service answers.
type orderService struct {
	*store
	subjects subjects
}

func newOrderService(ctx context.Context, db *sqlx.DB, schemaName string, subj subjects) (*orderService, error) {
	s, err := newStore(ctx, db, schemaName, `CREATE TABLE %s.orders (
		id          text   PRIMARY KEY,
		customer_id text   NOT NULL,
		amount      bigint NOT NULL CHECK (amount > 0),
		status      text   NOT NULL CHECK (status IN ('PENDING', 'APPROVED', 'REJECTED')))`)
	if err != nil {
		return nil, err
	}
	return &orderService{store: s, subjects: subj}, nil
}

// CreateOrder inserts a PENDING order and its OrderCreated event in one
// transaction: the event exists if and only if the order does.
func (s *orderService) CreateOrder(ctx context.Context, id, customerID string, amount int64) error {
	tx, err := s.db.BeginTxx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback() //nolint:errcheck // no-op after commit
	if _, err := tx.ExecContext(ctx, `INSERT INTO `+s.table("orders")+` (id, customer_id, amount, status) VALUES ($1, $2, $3, $4)`,
		id, customerID, amount, pending); err != nil {
		return fmt.Errorf("insert order %s: %w", id, err)
	}
	if _, err := s.outbox.Write(ctx, tx, outbox.Event{
		EntityType: "order",
		EntityID:   id,
		Type:       orderCreated,
		Subject:    s.subjects.of("order", orderCreated),
		Data:       orderCreatedEvent{OrderID: id, CustomerID: customerID, Amount: amount},
	}); err != nil {
		return fmt.Errorf("write %s of order %s: %w", orderCreated, id, err)
	}
	return tx.Commit()
}

// HandleCreditEvent approves the order of a CreditReserved event and
// rejects the order of a CreditLimitExceeded one. It runs in the dedup
// transaction, so it happens once per event.
func (s *orderService) HandleCreditEvent(ctx context.Context, tx *sqlx.Tx, msg jetstream.Msg) error {
	var status string
	switch typ := msg.Headers().Get(outbox.HeaderEventType); typ {
	case creditReserved:
		status = approved
	case creditLimitExceeded:
		status = rejected
	default:
		return dedup.Permanent(fmt.Errorf("unexpected event type %q", typ))
	}
	var ev creditEvent
	if err := json.Unmarshal(msg.Data(), &ev); err != nil {
		return dedup.Permanent(fmt.Errorf("decode credit event: %w", err))
	}
	res, err := tx.ExecContext(ctx, `UPDATE `+s.table("orders")+` SET status = $2 WHERE id = $1 AND status = $3`,
		ev.OrderID, status, pending)
	if err != nil {
		return fmt.Errorf("update order %s: %w", ev.OrderID, err)
	}
	if n, err := res.RowsAffected(); err != nil {
		return err
	} else if n == 0 {
		return dedup.Permanent(fmt.Errorf("order %s is unknown or no longer %s", ev.OrderID, pending))
	}
	return nil
}

// order is a row of the orders table.
type order struct {
	ID         string `db:"id"`
	CustomerID string `db:"customer_id"`
	Amount     int64  `db:"amount"`
	Status     string `db:"status"`
}

// Orders returns every order by id.
func (s *orderService) Orders(ctx context.Context) (map[string]order, error) {
	var rows []order
	if err := s.db.SelectContext(ctx, &rows, `SELECT id, customer_id, amount, status FROM `+s.table("orders")); err != nil {
		return nil, fmt.Errorf("read orders: %w", err)
	}
	orders := make(map[string]order, len(rows))
	for _, o := range rows {
		orders[o.ID] = o
	}
	return orders, nil
}

// customerService owns the customers' credit. For each OrderCreated it
// reserves the order's amount if the customer's limit allows, and answers
// CreditReserved or CreditLimitExceeded through its own outbox.
type customerService struct {
	*store
	subjects subjects
}

func newCustomerService(ctx context.Context, db *sqlx.DB, schemaName string, subj subjects) (*customerService, error) {
	s, err := newStore(ctx, db, schemaName, `CREATE TABLE %s.customers (
		id              text   PRIMARY KEY,
		credit_limit    bigint NOT NULL CHECK (credit_limit >= 0),
		credit_reserved bigint NOT NULL DEFAULT 0 CHECK (credit_reserved >= 0))`)
	if err != nil {
		return nil, err
	}
	return &customerService{store: s, subjects: subj}, nil
}

// AddCustomer inserts a customer with a credit limit and nothing reserved.
func (s *customerService) AddCustomer(ctx context.Context, id string, limit int64) error {
	if _, err := s.db.ExecContext(ctx, `INSERT INTO `+s.table("customers")+` (id, credit_limit) VALUES ($1, $2)`, id, limit); err != nil {
		return fmt.Errorf("insert customer %s: %w", id, err)
	}
	return nil
}

// HandleOrderCreated reserves credit for a new order, or refuses it, and
// writes the answer to the outbox. It runs in the dedup transaction: the
// reservation, the answer and the processed marker commit together.
func (s *customerService) HandleOrderCreated(ctx context.Context, tx *sqlx.Tx, msg jetstream.Msg) error {
	var ev orderCreatedEvent
	if err := json.Unmarshal(msg.Data(), &ev); err != nil {
		return dedup.Permanent(fmt.Errorf("decode %s: %w", orderCreated, err))
	}
	// Lock the customer: concurrent orders of one customer must not both
	// see the same reserved credit, and the customer's events must be
	// written in the order their transactions commit.
	var limit, reserved int64
	err := tx.QueryRowContext(ctx, `SELECT credit_limit, credit_reserved FROM `+s.table("customers")+` WHERE id = $1 FOR UPDATE`,
		ev.CustomerID).Scan(&limit, &reserved)
	if errors.Is(err, sql.ErrNoRows) {
		return dedup.Permanent(fmt.Errorf("order %s: unknown customer %q", ev.OrderID, ev.CustomerID))
	}
	if err != nil {
		return fmt.Errorf("lock customer %s: %w", ev.CustomerID, err)
	}
	answer := creditLimitExceeded
	if reserved+ev.Amount <= limit {
		answer = creditReserved
		reserved += ev.Amount
		if _, err := tx.ExecContext(ctx, `UPDATE `+s.table("customers")+` SET credit_reserved = $2 WHERE id = $1`,
			ev.CustomerID, reserved); err != nil {
			return fmt.Errorf("reserve credit of customer %s: %w", ev.CustomerID, err)
		}
	}
	if _, err := s.outbox.Write(ctx, tx, outbox.Event{
		EntityType: "customer",
		EntityID:   ev.CustomerID,
		Type:       answer,
		Subject:    s.subjects.of("customer", answer),
		Data: creditEvent{OrderID: ev.OrderID, CustomerID: ev.CustomerID, Amount: ev.Amount,
			CreditLimit: limit, CreditReserved: reserved},
	}); err != nil {
		return fmt.Errorf("write %s of order %s: %w", answer, ev.OrderID, err)
	}
	return nil
}

// Reserved returns each customer's reserved credit.
func (s *customerService) Reserved(ctx context.Context) (map[string]int64, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT id, credit_reserved FROM `+s.table("customers"))
	if err != nil {
		return nil, fmt.Errorf("read customers: %w", err)
	}
	defer rows.Close()
	reserved := map[string]int64{}
	for rows.Next() {
		var id string
		var n int64
		if err := rows.Scan(&id, &n); err != nil {
			return nil, err
		}
		reserved[id] = n
	}
	return reserved, rows.Err()
}
