package poller

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgnats/outbox/pkg/outbox"
)

// JetStream API error codes the loop treats specially.
const (
	jsInsufficientResources = 10023 // the server or account is out of storage
	jsMessageTooLarge       = 10054 // over the stream's max_msg_size
	jsStoreFailed           = 10077 // stream full under DiscardNew, among others
)

// markGrace is how long the mark may take after the acks are in.
const markGrace = 10 * time.Second

// cycle claims, publishes and marks one batch and returns how many rows it
// claimed. Once rows are claimed the batch is finished even if ctx is
// cancelled, so a stopping publisher marks what JetStream acknowledged.
func (p *Poller) cycle(ctx context.Context) (int, error) {
	select {
	case <-p.lead.lostCh():
		return 0, errLostLeadership
	default:
	}
	start := time.Now()
	tx, rows, err := p.claim(ctx, p.cfg.BatchSize)
	if err != nil {
		return 0, err
	}
	if len(rows) == 0 {
		if tx == nil {
			return 0, nil
		}
		return 0, tx.Rollback()
	}
	p.log.Debug("batch claimed", "rows", len(rows), "first_seq", rows[0].seq)
	bctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), p.cfg.AckTimeout+markGrace)
	defer cancel()
	acked, refused, outage := p.publish(ctx, bctx, rows)
	if err := p.mark(bctx, tx, acked, refused); err != nil {
		return len(rows), err
	}
	p.batches.Add(1)
	p.cfg.Metrics.batch(len(rows), len(acked), start)
	p.published.Add(int64(len(acked)))
	p.refused.Add(int64(len(refused)))
	for _, r := range refused {
		if r.permanent || p.attemptsOf(rows, r.id)+1 >= p.cfg.MaxAttempts {
			p.failed.Add(1)
			p.cfg.Metrics.outcome(OutcomeFailed)
			p.log.Error("event failed for good", "event_id", r.id, "reason", r.reason)
		} else {
			p.cfg.Metrics.outcome(OutcomeRetried)
			p.log.Warn("event refused; will retry", "event_id", r.id, "reason", r.reason)
		}
	}
	return len(rows), outage
}

func (p *Poller) attemptsOf(rows []row, id string) int {
	for i := range rows {
		if rows[i].id == id {
			return rows[i].attempts
		}
	}
	return 0
}

// publish sends rows in seq order and waits for their acks. Sending stops
// when ctx ends (the pre-send check asks JetStream under ctx); waiting for
// the acks of what was sent, and sorting errors, run under bctx. It returns the
// acked ids, the refused rows, and a non-nil outage error when the broker
// could not be reached or did not answer in time; rows in neither list stay
// READY untouched.
func (p *Poller) publish(ctx, bctx context.Context, rows []row) (acked []string, refused []refusal, outage error) {
	type inflight struct {
		r   *row
		paf jetstream.PubAckFuture
		at  time.Time // when it was sent
	}
	if p.cfg.SkipPublish {
		for i := range rows {
			acked = append(acked, rows[i].id)
		}
		return acked, nil, nil
	}
	blocked := map[string]bool{} // entities with a refused row in this batch
	sent := make([]inflight, 0, len(rows))
	refuse := func(r *row, reason string, permanent bool) {
		refused = append(refused, refusal{id: r.id, reason: reason, permanent: permanent})
		blocked[r.entity()] = true
	}
	for i := range rows {
		r := &rows[i]
		if outage != nil || blocked[r.entity()] {
			continue
		}
		msg, err := message(r)
		if err != nil {
			refuse(r, err.Error(), true)
			continue
		}
		if reason, permanent, err := p.preflight(ctx, msg); err != nil {
			outage = err
			continue
		} else if reason != "" {
			refuse(r, reason, permanent)
			continue
		}
		paf, err := p.js.PublishMsgAsync(msg)
		if err != nil {
			outage = fmt.Errorf("publish %s: %w", r.id, err)
			continue
		}
		sent = append(sent, inflight{r: r, paf: paf, at: time.Now()})
	}

	deadline := time.NewTimer(p.cfg.AckTimeout)
	defer deadline.Stop()
	for _, s := range sent {
		select {
		case <-s.paf.Ok():
			p.cfg.Metrics.acked(s.at)
			acked = append(acked, s.r.id)
		case err := <-s.paf.Err():
			reason, permanent, out := p.classify(bctx, s.r.subject, err)
			if out != nil {
				outage = firstErr(outage, out)
				continue
			}
			if blocked[s.r.entity()] {
				// A later event of this entity may already be stored; it is
				// marked as such below, and the order break is logged.
				p.log.Warn("event refused after a later event of its entity was sent",
					"event_id", s.r.id, "entity_type", s.r.entityType, "entity_id", s.r.entityID)
			}
			refuse(s.r, reason, permanent)
		case <-deadline.C:
			return acked, refused, firstErr(outage, fmt.Errorf("no PubAck within %s: %w", p.cfg.AckTimeout, context.DeadlineExceeded))
		}
	}
	return acked, refused, outage
}

// firstErr returns the first non-nil error.
func firstErr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

// preflight checks that msg can be stored before it is sent: a stream covers
// its subject and it fits the server's and the stream's size limits. It
// returns a refusal reason, or an error when JetStream could not be asked.
func (p *Poller) preflight(ctx context.Context, msg *nats.Msg) (reason string, permanent bool, err error) {
	size := len(msg.Subject) + len(msg.Data)
	for k, vs := range msg.Header {
		for _, v := range vs {
			size += len(k) + len(v) + 4 // "k: v\r\n"
		}
	}
	if limit := int(p.cfg.NATS.MaxPayload()); limit > 0 && size > limit {
		return fmt.Sprintf("message is %d bytes, over the NATS server's max_payload of %d", size, limit), true, nil
	}
	si, err := p.streams.lookup(ctx, msg.Subject)
	if errors.Is(err, errNoStream) {
		return fmt.Sprintf("no JetStream stream covers subject %q", msg.Subject), false, nil
	}
	if err != nil {
		return "", false, err
	}
	if si.maxMsgSize > 0 && size > si.maxMsgSize {
		return fmt.Sprintf("message is %d bytes, over stream %s's max_msg_size of %d", size, si.name, si.maxMsgSize), true, nil
	}
	return "", false, nil
}

// classify sorts a publish error: a refusal of this event (with its reason
// and whether retrying can help), or an outage to back off from.
func (p *Poller) classify(ctx context.Context, subject string, err error) (reason string, permanent bool, outage error) {
	var apiErr *jetstream.APIError
	switch {
	case errors.As(err, &apiErr):
		switch apiErr.ErrorCode {
		case jsStoreFailed, jsInsufficientResources:
			return "", false, fmt.Errorf("stream cannot store: %w", err)
		case jsMessageTooLarge:
			return apiErr.Error(), true, nil
		}
		p.streams.forget(subject)
		return apiErr.Error(), false, nil
	case errors.Is(err, jetstream.ErrNoStreamResponse):
		// "No responders" is a refusal only if JetStream says no stream
		// covers the subject; otherwise the stream is unavailable.
		p.streams.forget(subject)
		if _, lerr := p.streams.lookup(ctx, subject); errors.Is(lerr, errNoStream) {
			return fmt.Sprintf("no JetStream stream covers subject %q", subject), false, nil
		}
		return "", false, fmt.Errorf("no responders for %q: %w", subject, err)
	}
	return "", false, fmt.Errorf("publish: %w", err)
}

// message builds the NATS message of a row.
func message(r *row) (*nats.Msg, error) {
	user, err := r.userHeaders()
	if err != nil {
		return nil, fmt.Errorf("stored event %s: %w", r.id, err)
	}
	m := nats.NewMsg(r.subject)
	m.Data = r.data
	for k, v := range user {
		m.Header.Set(k, v)
	}
	m.Header.Set(jetstream.MsgIDHeader, r.id)
	m.Header.Set(outbox.HeaderEventID, r.id)
	m.Header.Set(outbox.HeaderEventType, r.eventType)
	m.Header.Set(outbox.HeaderEntityType, r.entityType)
	m.Header.Set(outbox.HeaderEntityID, r.entityID)
	m.Header.Set(outbox.HeaderSeq, strconv.FormatInt(r.seq, 10))
	m.Header.Set(outbox.HeaderCreatedAt, r.createdAt.UTC().Format(time.RFC3339Nano))
	return m, nil
}
