package poller

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgnats/outbox/internal/wire"
)

// JetStream API error codes the loop treats specially.
const (
	jsMessageTooLarge = 10054 // over the stream's max_msg_size
	jsHeaderTooLarge  = 10097 // header block over 64 KiB
)

// refusalCodes are the JetStream API error codes (nats-server's
// errors.json) that refuse one message for what it is or where it goes,
// with whether retrying it can help. Every other code, and any code added
// to the server later, is treated as an outage: the loop backs off and no
// attempt is used, so a broker incident never burns an event's attempts.
var refusalCodes = map[jetstream.ErrorCode]bool{ // code: permanent
	jsMessageTooLarge: true,
	jsHeaderTooLarge:  true,
	10165:             true,  // invalid per-message TTL
	10060:             false, // expected stream does not match
	10070:             false, // wrong last msg ID
	10071:             false, // wrong last sequence
	10164:             false, // wrong last sequence
	10193:             false, // missing sequence for expected last sequence per subject
	10109:             false, // invalid operation on sealed stream
	10166:             false, // per-message TTL is disabled
	10168:             false, // message counters are disabled
	10169:             false, // message counter increment is missing
	10170:             false, // message counter has a payload
	10171:             false, // message counter increment is invalid
	10227:             false, // message stream source header is not allowed
}

// noClientRetry turns off nats.go's own retry of a publish that got "no
// responders" (by default twice, 250ms apart, each message on its own
// timer): a message retried behind the loop's back is stored after later
// events of its entity that were sent meanwhile. The failure comes back to
// the loop instead, which sends the entity's events again in seq order.
var noClientRetry = jetstream.WithRetryAttempts(0)

// markGrace is how long the mark may take after the acks are in.
const markGrace = 10 * time.Second

// batch is a claimed set of rows whose claim transaction is open: sent,
// waiting for acks, not yet marked.
type batch struct {
	tx      *sql.Tx
	rows    []row
	started time.Time
	checked time.Time // when this process last knew it still led
	sentAt  time.Time
	sent    []inflight
	refused []refusal
	// refusedEntities had a row refused before sending: their later rows
	// were not sent, and the next batch must not send them either until
	// this batch's mark records the refusal.
	refusedEntities map[string]bool
	outage          error // sending stopped: the broker could not be asked or reached
	// unanswered: a message of this batch that no stream's filter covers
	// got no PubAck in time (sendUncovered); the batch sends no other such
	// message, so that it waits --ack-timeout at most once.
	unanswered bool
	// next is the batch claimed and sent while this one was in flight.
	next *batch
	// unstored maps an entity to its earliest event this batch sent that
	// JetStream did not store (refused, failed or unacknowledged); behind
	// holds the same for the batch in flight ahead of this one, known once
	// that batch is finished. A later event of such an entity that is
	// stored breaks the entity's order: see orderBroken.
	unstored, behind map[string]*row
}

type inflight struct {
	r   *row
	paf jetstream.PubAckFuture
	at  time.Time // when it was sent
	// answered: awaitAnswers took its answer before collect, acked or err.
	answered bool
	acked    bool
	err      error
}

// step is one turn of the pipeline: claim and send a new batch while the
// previous one's acks are in flight, then finish the previous one (acks,
// mark, commit; the mark may go on in the background during the next step,
// see finish). At most one batch is in flight between steps. It returns
// the number of rows claimed, and whether the step showed the loop healthy:
// it finished a batch without an outage, or found nothing due with nothing
// in flight. When the previous batch hit an outage, no new batch is claimed;
// after one, the broker is asked whether it answers before the next claim,
// so an outage does not lock a batch on every back-off.
func (p *Poller) step(ctx context.Context) (n int, healthy bool, err error) {
	prev := p.inflight
	p.inflight = nil
	finished := false
	if prev != nil && (p.careful() || p.slowClaims) {
		// No pipelining while careful, or while claims are slow (see
		// claimLimits): the batch ahead is finished before the next claim.
		if _, err := p.finish(ctx, prev, false); err != nil {
			return 0, false, err
		}
		prev, finished = nil, true
	}
	var cur *batch
	select {
	case <-p.lead.lostCh():
		err = fmt.Errorf("heartbeat on the lock session: %w: %w", p.lead.lostErr, errLostLeadership)
	default:
		if prev == nil || prev.outage == nil {
			var skip map[string]bool
			if prev != nil {
				skip = prev.refusedEntities
			}
			if err = p.brokerAnswers(ctx); err == nil {
				cur, err = p.start(ctx, skip, prev)
			}
			if prev != nil {
				prev.next = cur
			}
		}
	}
	healthy = err == nil && prev == nil && (cur == nil || finished)
	if prev != nil {
		// Healthy only once a mark committed: one that went to the
		// background proves nothing until it is joined.
		marked, ferr := p.finish(ctx, prev, true)
		healthy = err == nil && ferr == nil && marked
		err = firstErr(ferr, err)
	}
	if cur == nil {
		// Nothing in flight: nor is a mark left running.
		joined, jerr := p.joinMark()
		return 0, (healthy || joined) && err == nil && jerr == nil, firstErr(err, jerr)
	}
	if err != nil {
		// Finish what was sent before backing off.
		_, ferr := p.finish(ctx, cur, false)
		return len(cur.rows), false, firstErr(err, ferr)
	}
	p.inflight = cur
	return len(cur.rows), healthy, nil
}

// brokerAnswers, after a batch hit an outage, checks that the NATS
// connection is up and that JetStream answers an API request before the
// loop claims again: it reads the stream list afresh, which the checks
// before sending use and which the outage may have changed. It returns nil
// at once when no outage was seen since the last check that passed.
func (p *Poller) brokerAnswers(ctx context.Context) error {
	if !p.suspect || p.cfg.SkipPublish {
		return nil
	}
	if st := p.cfg.NATS.Status(); st != nats.CONNECTED {
		return fmt.Errorf("broker connection is %s", st)
	}
	actx, cancel := context.WithTimeout(ctx, p.cfg.AckTimeout)
	defer cancel()
	if err := p.streams.refresh(actx); err != nil {
		return err
	}
	p.suspect = false
	return nil
}

// drain finishes the batch in flight, if any, and the mark running in the
// background.
func (p *Poller) drain(ctx context.Context) error {
	b := p.inflight
	p.inflight = nil
	if b == nil {
		_, err := p.joinMark()
		return err
	}
	_, err := p.finish(ctx, b, false)
	return err
}

// start claims a batch and sends its rows, except rows of entities in skip.
// ahead is the batch in flight, or nil: together the two hold at most
// about twice BatchBytes. It returns nil when nothing was due.
//
// The claim runs while ahead's acks are on their way; the batch is sent
// only once every publish of ahead has its answer (awaitAnswers), and not
// at all when one of them failed: its rows are left for a later step, after
// ahead is finished. Sent earlier, an entity's later events could be stored
// ahead of its earlier ones that ahead failed to store, as when a clustered
// stream changes leader: "no responders" for ahead, and the new leader
// storing this batch a few milliseconds later.
func (p *Poller) start(ctx context.Context, skip map[string]bool, ahead *batch) (*batch, error) {
	started := time.Now()
	budget := claimBudget{rows: p.cfg.BatchSize, bytes: int64(p.cfg.BatchBytes), ahead: ahead != nil}
	if ahead != nil {
		for _, s := range ahead.sent {
			budget.inflight = append(budget.inflight, s.r.seq)
		}
	}
	if p.marking != nil {
		budget.inflight = append(budget.inflight, p.marking.acked...)
	}
	tx, rows, err := p.claim(ctx, budget, !p.busy)
	p.busy = len(rows) > 0
	if err != nil {
		return nil, err
	}
	if len(rows) == 0 || (ahead != nil && !p.awaitAnswers(ctx, ahead)) {
		if tx != nil {
			return nil, tx.Rollback()
		}
		return nil, nil
	}
	b := &batch{tx: tx, rows: rows, started: started, checked: time.Now(), refusedEntities: map[string]bool{}}
	p.log.Debug("batch claimed", "rows", len(rows), "bytes", b.bytes(), "first_seq", rows[0].seq)
	p.send(ctx, b, skip)
	return b, nil
}

// finish waits for a batch's acks, marks it and commits. Once rows are
// claimed the batch is finished even if ctx is cancelled, so a stopping
// publisher marks what JetStream acknowledged. It returns the batch's
// outage, or the mark's error, or the error of the mark that ran in the
// background before it; and whether a mark committed meanwhile (b's, or
// the one before it).
//
// With background set, a batch whose every row was acked (the common case
// under load) is marked on another goroutine, while the loop claims and
// sends the next batch: PostgreSQL updates one batch's rows while the
// publisher builds the next one's messages. At most one mark runs so. The
// next finish waits for it before marking, and so does every step that
// ends with no batch in flight (joinMark); meanwhile the claims count its
// rows as sent by this publisher (start), as they do the batch in flight.
// A batch with a refusal or an outage is marked in the loop, so that the
// claims after it see the refusals recorded.
func (p *Poller) finish(ctx context.Context, b *batch, background bool) (marked bool, err error) {
	bctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), p.cfg.AckTimeout+markGrace)
	acked := p.collect(bctx, b)
	if b.outage != nil {
		p.suspect = true
	}
	if b.next != nil {
		b.next.behind = b.unstored
	}
	marked, err = p.joinMark()
	m, merr := p.markJob(bctx, b.tx, acked, b.refused)
	if merr != nil {
		cancel()
		b.tx.Rollback() //nolint:errcheck
		return marked, firstErr(err, merr)
	}
	if background && err == nil && b.outage == nil && len(b.refused) == 0 {
		pm := &pendingMark{b: b, acked: acked, done: make(chan error, 1)}
		go func() {
			defer cancel()
			err := m.run(bctx)
			pm.at = time.Now() // read after done, which orders it
			pm.done <- err
		}()
		p.marking = pm
		return marked, nil
	}
	defer cancel()
	if merr := m.run(bctx); merr != nil {
		return marked, firstErr(err, merr)
	}
	p.marked(b, len(acked), time.Now())
	return true, firstErr(err, b.outage)
}

// pendingMark is the mark of a batch running in the background: see
// finish.
type pendingMark struct {
	b     *batch
	acked []int64   // seqs
	at    time.Time // when the mark ended; set before done is sent on
	done  chan error
}

// joinMark waits for the mark running in the background, if any, and
// returns whether one committed, or its error.
func (p *Poller) joinMark() (joined bool, err error) {
	m := p.marking
	if m == nil {
		return false, nil
	}
	p.marking = nil
	if err := <-m.done; err != nil {
		return false, err
	}
	p.marked(m.b, len(m.acked), m.at)
	return true, nil
}

// marked counts and logs a batch whose mark committed at at, acked of its
// rows published.
func (p *Poller) marked(b *batch, acked int, at time.Time) {
	p.batches.Add(1)
	p.cfg.Metrics.batch(len(b.rows), acked, at.Sub(b.started))
	p.published.Add(int64(acked))
	p.refused.Add(int64(len(b.refused)))
	for _, r := range b.refused {
		if r.permanent || r.attempts+1 >= p.cfg.MaxAttempts {
			p.failed.Add(1)
			p.cfg.Metrics.outcome(OutcomeFailed)
			p.log.Error("event failed for good", "event_id", r.id, "reason", r.reason)
		} else {
			p.cfg.Metrics.outcome(OutcomeRetried)
			p.log.Warn("event refused; will retry", "event_id", r.id, "reason", r.reason)
		}
	}
}

// send sends the batch's rows in seq order. It stops at the first outage
// (the pre-send check asks JetStream under ctx, so a stop interrupts it).
// A row refused before sending holds back the later rows of its entity.
func (p *Poller) send(ctx context.Context, b *batch, skip map[string]bool) {
	b.sent = make([]inflight, 0, len(b.rows))
	defer func() { b.sentAt = time.Now() }()
	if p.cfg.SkipPublish {
		return
	}
	var first map[string]bool // careful: the entities that have a row sent
	if p.careful() {
		first = map[string]bool{}
	}
	for i := range b.rows {
		r := &b.rows[i]
		if b.outage != nil || skip[r.entity()] || b.refusedEntities[r.entity()] || first != nil && first[r.entity()] {
			continue
		}
		if first != nil {
			first[r.entity()] = true
		}
		if time.Since(b.checked) > p.cfg.LeaderTimeout/2 {
			// The process stalled (a freeze, a long pause) since the claim:
			// it may have lost the lock meanwhile. Check before sending, so
			// a fenced-out leader does not keep publishing its old claim.
			if err := p.stillLeads(ctx, b.tx); err != nil {
				b.outage = err
				continue
			}
			b.checked = time.Now()
		}
		// The rule Write applied, again: a row that cannot be published
		// (written by an older writer, or by SQL) is FAILED with the reason
		// rather than refused by the client or the server.
		msg, size, err := message(r, int(p.cfg.NATS.MaxPayload()), p.cfg.MaxControlLine)
		if err != nil {
			b.refuse(r, err.Error(), true)
			continue
		}
		if reason, permanent, err := p.preflight(ctx, msg, size); errors.Is(err, errNoStream) {
			p.sendUncovered(ctx, b, r, msg)
			continue
		} else if err != nil {
			b.outage = err
			continue
		} else if reason != "" {
			b.refuse(r, reason, permanent)
			continue
		}
		paf, err := p.js.PublishMsgAsync(msg, noClientRetry)
		if reason, refused := refusedByClient(err); refused {
			b.refuse(r, reason, true)
			continue
		}
		if err != nil {
			b.outage = fmt.Errorf("publish %s: %w", r.id, err)
			continue
		}
		b.sent = append(b.sent, inflight{r: r, paf: paf, at: time.Now()})
	}
}

// bytes is what the batch's rows count against the claim's byte budget.
func (b *batch) bytes() int64 {
	var n int64
	for i := range b.rows {
		n += int64(len(b.rows[i].data) + len(b.rows[i].headers))
	}
	return n
}

func (b *batch) refuse(r *row, reason string, permanent bool) {
	b.refused = append(b.refused, refusal{id: r.id, reason: reason, permanent: permanent, attempts: r.attempts})
	b.refusedEntities[r.entity()] = true
}

// collect waits for the acks of what b sent, up to AckTimeout after the
// send, and returns the acked rows' seqs. Refusals are added to b.refused; a
// missing ack or an outage-class error sets b.outage.
func (p *Poller) collect(ctx context.Context, b *batch) (acked []int64) {
	if p.cfg.SkipPublish {
		for i := range b.rows {
			acked = append(acked, b.rows[i].seq)
		}
		return acked
	}
	deadline := time.NewTimer(time.Until(b.sentAt.Add(p.cfg.AckTimeout)))
	defer deadline.Stop()
	expired := false
	for _, s := range b.sent {
		var (
			err error
			ok  bool
		)
		if s.answered {
			ok, err = s.acked, s.err
		} else if !expired {
			select {
			case <-s.paf.Ok():
				ok = true
			case err = <-s.paf.Err():
			case <-deadline.C:
				expired = true
			}
		}
		if expired && !s.answered {
			// Past the deadline, take what has arrived: when an ack and the
			// deadline are both ready, select picks either, and an acked
			// batch must not be taken for an outage.
			select {
			case <-s.paf.Ok():
				ok = true
			case err = <-s.paf.Err():
			default:
				// Not stored as far as this publisher knows. The later
				// messages are still looked at: an ack that arrived for
				// one of them must not be dropped because an earlier
				// message (of a stream that does not answer, say) got
				// none.
				b.outage = firstErr(b.outage, fmt.Errorf("no PubAck within %s: %w", p.cfg.AckTimeout, context.DeadlineExceeded))
				b.notStored(s.r)
				p.beCareful()
				continue
			}
		}
		if ok {
			p.cfg.Metrics.acked(s.at)
			acked = append(acked, s.r.seq)
			p.orderBroken(b, s.r)
			continue
		}
		b.notStored(s.r)
		p.beCareful()
		reason, permanent, out := p.classify(ctx, s.r.subject, err)
		if out != nil {
			b.outage = firstErr(b.outage, out)
			continue
		}
		b.refuse(s.r, reason, permanent)
	}
	return acked
}

// carefulFor is how long the loop stays careful after JetStream failed to
// store a message it sent (refused it, did not answer, or answered "no
// responders"): it then sends one event of each entity a batch, and claims
// the next batch only once the one ahead is finished. A broker in trouble
// may answer differently to two messages sent a moment apart (a stream
// coming back between them), storing an entity's later event after its
// earlier one failed; careful, a later event is sent only once the earlier
// one is stored. It costs throughput only while it lasts.
const carefulFor = 5 * time.Second

// careful reports whether the loop is careful: see carefulFor.
func (p *Poller) careful() bool { return time.Now().Before(p.carefulUntil) }

// beCareful makes the loop careful for carefulFor from now.
func (p *Poller) beCareful() {
	if !p.careful() {
		p.log.Info("JetStream failed to store a message; sending one event per entity per batch, without pipelining, for a while",
			"for", carefulFor)
	}
	p.carefulUntil = time.Now().Add(carefulFor)
}

// awaitAnswers waits until every publish of b has its answer, an ack or
// an error, which it keeps for collect, and reports whether all were acked.
// It gives up (false) at b's ack deadline, as collect would, or when ctx
// ends. It stops at the first error: the caller holds its batch back.
func (p *Poller) awaitAnswers(ctx context.Context, b *batch) bool {
	if p.cfg.SkipPublish || b.outage != nil {
		return b.outage == nil
	}
	deadline := time.NewTimer(time.Until(b.sentAt.Add(p.cfg.AckTimeout)))
	defer deadline.Stop()
	for i := range b.sent {
		s := &b.sent[i]
		if !s.answered {
			select {
			case <-s.paf.Ok():
				s.answered, s.acked = true, true
			case s.err = <-s.paf.Err():
				s.answered = true
			case <-deadline.C:
				return false
			case <-ctx.Done():
				return false
			}
		}
		if !s.acked {
			return false
		}
	}
	return true
}

// notStored records that JetStream did not store r, which was sent.
func (b *batch) notStored(r *row) {
	if b.unstored == nil {
		b.unstored = map[string]*row{}
	}
	if _, ok := b.unstored[r.entity()]; !ok {
		b.unstored[r.entity()] = r
	}
}

// orderBroken checks, for r just stored, whether an earlier event of its
// entity sent ahead of it, in its batch or in the batch in flight ahead of
// it, was not stored: r then reached the stream first, and the earlier
// event, sent again later, arrives after it. That is logged and counted
// (Metrics.OrderViolations). It is the price of sending an entity's events
// without waiting for each ack; see docs/ARCHITECTURE.md "Ordering,
// precisely".
func (p *Poller) orderBroken(b *batch, r *row) {
	first := b.unstored[r.entity()]
	if ahead := b.behind[r.entity()]; ahead != nil {
		first = ahead
	}
	if first == nil || first.seq > r.seq {
		return
	}
	p.violations.Add(1)
	p.cfg.Metrics.orderViolation()
	p.log.Warn("event stored after an earlier event of its entity that was sent ahead of it was not; the entity's order is broken",
		"event_id", r.id, "seq", r.seq, "earlier_event_id", first.id, "earlier_seq", first.seq,
		"entity_type", r.entityType, "entity_id", r.entityID)
}

// firstErr returns the first non-nil error.
func firstErr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

// refusedByClient reports whether err, returned by PublishMsgAsync, is the
// NATS client refusing this one message (so retrying it cannot help), and
// the reason; other errors (a closed or draining connection, too many
// pending acks) concern every message and are an outage.
func refusedByClient(err error) (string, bool) {
	for _, e := range []error{nats.ErrBadSubject, nats.ErrBadHeaderMsg, nats.ErrMaxPayload, nats.ErrInvalidMsg,
		jetstream.ErrAsyncPublishReplySubjectSet} {
		if errors.Is(err, e) {
			return "the NATS client refused the message: " + err.Error(), true
		}
	}
	return "", false
}

// preflight checks that msg, of size bytes (headers and payload), can be
// stored before it is sent: a stream covers its subject (errNoStream when
// no stream's filter does and the subject was never stored through a
// mapping: see sendUncovered), that stream
// acknowledges what it stores (not no_ack), and msg fits the stream's size
// limit (wire.Build checked the server's). It returns a refusal reason, or
// an error when JetStream could not be asked.
func (p *Poller) preflight(ctx context.Context, msg *nats.Msg, size int) (reason string, permanent bool, err error) {
	si, err := p.streams.lookup(ctx, msg.Subject)
	if errors.Is(err, errNoStream) {
		if p.mapped[msg.Subject] {
			// Stored before through a subject mapping: send it as usual.
			return "", false, nil
		}
		return "", false, errNoStream
	}
	if err != nil {
		return "", false, err
	}
	if si.noAck {
		// The stream would store the event but never say so: with no ack
		// the event stays READY and is sent again after every back-off, a
		// new copy stored each time the duplicate window has passed.
		// Delivery at least once cannot be confirmed, so it is not tried.
		return fmt.Sprintf("stream %s is configured with no_ack: it never acknowledges a publish, so the event's storage cannot be confirmed", si.name), true, nil
	}
	if si.maxMsgSize > 0 && size > si.maxMsgSize {
		return fmt.Sprintf("message is %d bytes, over stream %s's max_msg_size of %d", size, si.name, si.maxMsgSize), true, nil
	}
	return "", false, nil
}

// sendUncovered publishes r's message msg, whose subject no stream's filter
// covers, synchronously: an account subject mapping may still send it to a
// stream, which JetStream's list of streams does not show. A PubAck is
// success, and the subject is remembered (p.mapped) so that later messages
// to it are sent asynchronously; "no responders" is the refusal that no
// stream covers the subject, since JetStream was asked and named none. A
// subject starting with "$" (NATS's own: $JS.API, $SYS, ...) is refused
// without sending: it would be a request to the server, not an event. The
// send happens in the loop's order, so an earlier event of r's entity is
// already sent ahead of it, and a refusal keeps r's later events in the
// batch from being sent (batch.refuse). After one such message of the batch
// got no PubAck in time, the others are left READY for a later batch
// unsent, so that a batch waits for an answer that may never come once.
func (p *Poller) sendUncovered(ctx context.Context, b *batch, r *row, msg *nats.Msg) {
	noStream := fmt.Sprintf("no JetStream stream covers subject %q", msg.Subject)
	if strings.HasPrefix(msg.Subject, "$") {
		b.refuse(r, noStream+", and a subject starting with $ (NATS's own, such as $JS.API or $SYS) is never sent to find out", true)
		return
	}
	if b.unanswered {
		// Not sent: the row stays READY for a later batch, and its
		// entity's later rows wait with it.
		b.refusedEntities[r.entity()] = true
		return
	}
	sctx, cancel := context.WithTimeout(ctx, p.cfg.AckTimeout)
	defer cancel()
	at := time.Now()
	_, err := p.js.PublishMsg(sctx, msg, noClientRetry)
	if err == nil {
		if len(p.mapped) >= subjectsKept {
			clear(p.mapped)
		}
		if p.mapped == nil {
			p.mapped = map[string]bool{}
		}
		p.mapped[msg.Subject] = true
		b.sent = append(b.sent, inflight{r: r, at: at, answered: true, acked: true})
		return
	}
	if reason, refused := refusedByClient(err); refused {
		b.refuse(r, reason, true)
		return
	}
	if ctx.Err() != nil {
		b.outage = fmt.Errorf("publish %s: %w", r.id, ctx.Err())
		return
	}
	b.notStored(r)
	switch {
	case errors.Is(err, jetstream.ErrNoStreamResponse):
		b.refuse(r, noStream+" (a publish to it got no responders)", false)
	case errors.Is(err, context.DeadlineExceeded):
		// Only a stream that never answers (no_ack), or none able to
		// answer in time, leaves a publish that no filter covers without
		// a reply. Counted as a refusal, so that the event ends FAILED
		// after MaxAttempts rather than holding its entity forever.
		b.refuse(r, fmt.Sprintf("%s, and a publish to it got no PubAck within %s", noStream, p.cfg.AckTimeout), false)
		b.unanswered = true
	default:
		reason, permanent, outage := p.classify(ctx, msg.Subject, err)
		if outage != nil {
			b.outage = outage
			return
		}
		b.refuse(r, reason, permanent)
	}
}

// classify sorts a publish error: a refusal of this event (with its reason
// and whether retrying can help), or an outage to back off from.
func (p *Poller) classify(ctx context.Context, subject string, err error) (reason string, permanent bool, outage error) {
	var apiErr *jetstream.APIError
	switch {
	case errors.As(err, &apiErr):
		if permanent, ok := refusalCodes[apiErr.ErrorCode]; ok {
			return apiErr.Error(), permanent, nil
		}
		return "", false, fmt.Errorf("JetStream could not store the message: %w", err)
	case errors.Is(err, jetstream.ErrNoStreamResponse):
		// "No responders" is a refusal only if JetStream says no stream
		// covers the subject; otherwise the stream is unavailable.
		p.streams.forget(subject)
		delete(p.mapped, subject)
		if _, lerr := p.streams.lookup(ctx, subject); errors.Is(lerr, errNoStream) {
			return fmt.Sprintf("no JetStream stream covers subject %q", subject), false, nil
		}
		return "", false, fmt.Errorf("no responders for %q: %w", subject, err)
	}
	return "", false, fmt.Errorf("publish: %w", err)
}

// wireEvent is the event of a stored row.
func wireEvent(r *row) (wire.Event, error) {
	user, err := r.userHeaders()
	if err != nil {
		return wire.Event{}, fmt.Errorf("stored event %s: %w", r.id, err)
	}
	return wire.Event{ID: r.id, Seq: r.seq, Subject: r.subject, Type: r.eventType, EntityType: r.entityType,
		EntityID: r.entityID, Data: r.data, Headers: user, CreatedAt: r.createdAt}, nil
}

// message builds the NATS message of a row with wire.Build, and returns it
// with its size, or why it cannot be published to a server whose
// max_payload is maxPayload and whose max_control_line is maxControlLine.
func message(r *row, maxPayload, maxControlLine int) (*nats.Msg, int, error) {
	ev, err := wireEvent(r)
	if err != nil {
		return nil, 0, err
	}
	m, size, err := wire.Build(ev, maxPayload, maxControlLine)
	if err != nil {
		return nil, 0, fmt.Errorf("stored event %s cannot be published: %w", r.id, err)
	}
	return m, size, nil
}
