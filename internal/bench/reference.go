package bench

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	"github.com/lib/pq"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// The reference pipeline is the yardstick the publisher's drain is held
// against in the same run: the naive serial loop anyone would write first,
// over a bare table holding the same payloads, with none of the outbox's
// guarantees (no order per entity, no fence, no retries, no byte budget):
//
//	BEGIN
//	SELECT … WHERE status = 'READY' ORDER BY id LIMIT n FOR UPDATE SKIP LOCKED
//	publish each row asynchronously with Nats-Msg-Id, wait for every ack
//	UPDATE … SET status = 'SUCCESS' WHERE id = ANY(…)
//	COMMIT
//
// With skipPublish it is the bare SQL claim-and-mark: the database's
// ceiling for this workload on a table with one partial index.
const (
	refTable  = "bench_reference"
	refCreate = `CREATE TABLE ` + refTable + ` (
		id      bigint GENERATED ALWAYS AS IDENTITY,
		msg_id  uuid   NOT NULL,
		subject text   NOT NULL,
		payload bytea  NOT NULL,
		status  text   NOT NULL DEFAULT 'READY');
		CREATE INDEX ` + refTable + `_ready ON ` + refTable + ` (id) WHERE status = 'READY'`
	refFill = `INSERT INTO ` + refTable + ` (msg_id, subject, payload)
		SELECT gen_random_uuid(), $1, $2 FROM generate_series(1, $3)`
	refClaim = `SELECT id, msg_id, subject, payload FROM ` + refTable + `
		WHERE status = 'READY' ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED`
	refMark = `UPDATE ` + refTable + ` SET status = 'SUCCESS'
		WHERE id = ANY($1::bigint[]) AND status = 'READY'`
)

// reference fills the bare table with the backlog's payloads and drains it
// with the serial loop, returning events per second and the cost.
func (e *env) reference(ctx context.Context, skipPublish bool) (float64, cost, error) {
	if err := e.reset(ctx); err != nil {
		return 0, cost{}, err
	}
	if _, err := e.db.ExecContext(ctx, `DROP TABLE IF EXISTS `+refTable+`; `+refCreate); err != nil {
		return 0, cost{}, fmt.Errorf("create the bare table: %w", err)
	}
	subject := e.prefix + ".reference"
	if _, err := e.db.ExecContext(ctx, refFill, subject, makePayload(e.cfg.Payload), e.cfg.Events); err != nil {
		return 0, cost{}, fmt.Errorf("fill the bare table: %w", err)
	}
	if _, err := e.db.ExecContext(ctx, `ANALYZE `+refTable); err != nil {
		return 0, cost{}, err
	}
	js, err := jetstream.New(e.nc, jetstream.WithPublishAsyncMaxPending(e.cfg.BatchSize*2))
	if err != nil {
		return 0, cost{}, err
	}
	claim, err := e.db.PrepareContext(ctx, refClaim)
	if err != nil {
		return 0, cost{}, err
	}
	defer claim.Close()
	mark, err := e.db.PrepareContext(ctx, refMark)
	if err != nil {
		return 0, cost{}, err
	}
	defer mark.Close()

	name := "reference pipeline"
	if skipPublish {
		name = "bare claim+mark"
	}
	e.prog.start(name, e.cfg.Events)
	meter, err := e.startMeter(ctx)
	if err != nil {
		return 0, cost{}, err
	}
	start := time.Now()
	done := 0
	for done < e.cfg.Events {
		n, err := refBatch(ctx, e, js, claim, mark, skipPublish)
		if err != nil {
			return 0, cost{}, err
		}
		if n == 0 {
			return 0, cost{}, fmt.Errorf("reference pipeline: table empty after %d of %d events", done, e.cfg.Events)
		}
		done += n
		e.prog.set(done)
	}
	elapsed := time.Since(start)
	c := meter.stop(ctx, done)
	e.prog.done()
	return float64(done) / elapsed.Seconds(), c, nil
}

// refBatch is one turn of the reference loop.
func refBatch(ctx context.Context, e *env, js jetstream.JetStream, claim, mark *sql.Stmt, skipPublish bool) (int, error) {
	tx, err := e.db.BeginTx(ctx, nil)
	if err != nil {
		return 0, err
	}
	defer tx.Rollback() //nolint:errcheck // no-op after commit
	rows, err := tx.StmtContext(ctx, claim).QueryContext(ctx, e.cfg.BatchSize)
	if err != nil {
		return 0, fmt.Errorf("reference claim: %w", err)
	}
	var (
		ids  []int64
		pafs []jetstream.PubAckFuture
	)
	for rows.Next() {
		var (
			id          int64
			msgID, subj string
			payload     []byte
		)
		if err := rows.Scan(&id, &msgID, &subj, &payload); err != nil {
			rows.Close()
			return 0, err
		}
		ids = append(ids, id)
		if skipPublish {
			continue
		}
		m := nats.NewMsg(subj)
		m.Data = payload
		m.Header.Set(jetstream.MsgIDHeader, msgID)
		paf, err := js.PublishMsgAsync(m)
		if err != nil {
			rows.Close()
			return 0, fmt.Errorf("reference publish: %w", err)
		}
		pafs = append(pafs, paf)
	}
	if err := rows.Close(); err != nil {
		return 0, err
	}
	for _, paf := range pafs {
		select {
		case <-paf.Ok():
		case err := <-paf.Err():
			return 0, fmt.Errorf("reference ack: %w", err)
		case <-time.After(30 * time.Second):
			return 0, fmt.Errorf("reference ack: %w", errTimeout)
		}
	}
	if len(ids) == 0 {
		return 0, nil
	}
	if _, err := tx.StmtContext(ctx, mark).ExecContext(ctx, pq.Array(ids)); err != nil {
		return 0, fmt.Errorf("reference mark: %w", err)
	}
	return len(ids), tx.Commit()
}
