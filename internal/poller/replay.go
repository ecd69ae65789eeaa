package poller

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgnats/outbox/internal/wire"
	"github.com/pgnats/outbox/schema"
)

// ReplayFilter selects SUCCESS events to publish again. Its conditions
// combine: an event must match all that are set. At least one must be set.
type ReplayFilter struct {
	// EntityType and EntityID select one entity's events.
	EntityType, EntityID string
	// FromSeq and ToSeq bound seq, both inclusive; 0 leaves that side open.
	FromSeq, ToSeq int64
	// Since and Until bound created_at: Since <= created_at < Until. The
	// zero time leaves that side open.
	Since, Until time.Time
}

// ReplayOptions configures Replay. The zero value of each field means its
// default.
type ReplayOptions struct {
	// RunID names this replay in Nats-Msg-Id and the Outbox-Replay header.
	// Required.
	RunID string
	// SubjectPrefix, when set, sends each event to SubjectPrefix + "." +
	// its original subject instead of the original subject.
	SubjectPrefix string
	// BatchSize is how many rows are read at once. Default: 500.
	BatchSize int
	// PageBytes is the most bytes of payload and stored headers read at
	// once; a first event larger than it is read alone. A page is sent and
	// acknowledged before the next is read, so it bounds the events held
	// in memory. Default: DefaultBatchBytes (32 MiB).
	PageBytes int
	// MaxInFlight bounds the messages sent and not yet acknowledged.
	// Default: 256.
	MaxInFlight int
	// AckTimeout bounds the wait for one PubAck. Default: 30s.
	AckTimeout time.Duration
	// MaxControlLine is the NATS server's max_control_line, in bytes (see
	// Config.MaxControlLine): an event whose replayed message would have a
	// longer protocol line stops the replay before it is sent. Default
	// wire.DefaultMaxControlLine (4096).
	MaxControlLine int
	// DryRun only counts the events the filter selects.
	DryRun bool
}

// ReplayResult is what a replay did.
type ReplayResult struct {
	// Selected is the number of SUCCESS events the filter selected when
	// the replay started.
	Selected int64
	// Published is the number of events JetStream acknowledged.
	Published int64
	// Duplicates is how many of those JetStream reported as duplicates of
	// a message already in the stream's duplicate window.
	Duplicates int64
}

// ReplayProgress is told, after each batch, how many selected events are
// acknowledged so far and how many there are in all.
type ReplayProgress func(done, total int64)

// ErrReplayRefused is wrapped by the error Replay returns when JetStream
// refuses an event; the error names the event.
var ErrReplayRefused = errors.New("JetStream refused a replayed event")

// ReplayMsgID is the Nats-Msg-Id of a replayed event: the event id with a
// suffix naming the replay, so the stream's duplicate window lets it in
// while pkg/dedup, which keys on the Outbox-Event-Id header, still drops it
// for a consumer that already processed the event.
func ReplayMsgID(eventID, runID string) string { return wire.ReplayMsgID(eventID, runID) }

// Replay publishes the SUCCESS events f selects again, in seq order, with
// the headers the publisher sets (see message) except Nats-Msg-Id, which
// is ReplayMsgID, plus Outbox-Replay set to o.RunID. It waits for each
// PubAck and stops at the first refusal, with an error wrapping
// ErrReplayRefused that names the event, or at the first ack that does not
// come within o.AckTimeout. Events published before a stop stay
// published. Replay does not change the events table. progress may be nil.
func Replay(ctx context.Context, db *sql.DB, js jetstream.JetStream, table string, f ReplayFilter, o ReplayOptions, progress ReplayProgress) (ReplayResult, error) {
	var res ReplayResult
	name, err := schema.ParseName(table)
	if err != nil {
		return res, err
	}
	where, args, err := f.where()
	if err != nil {
		return res, fmt.Errorf("replay: %w", err)
	}
	if o.RunID == "" && !o.DryRun {
		return res, errors.New("replay: a run id is required")
	}
	o.BatchSize = cmp.Or(o.BatchSize, 500)
	o.PageBytes = cmp.Or(o.PageBytes, DefaultBatchBytes)
	o.MaxInFlight = cmp.Or(o.MaxInFlight, 256)
	o.AckTimeout = cmp.Or(o.AckTimeout, 30*time.Second)
	t := name.Quoted()
	if err := db.QueryRowContext(ctx, `SELECT count(*) FROM `+t+` WHERE `+where, args...).Scan(&res.Selected); err != nil {
		return res, fmt.Errorf("count events to replay: %w", err)
	}
	if o.DryRun || res.Selected == 0 {
		return res, nil
	}
	if progress == nil {
		progress = func(int64, int64) {}
	}
	progress(0, res.Selected)

	// Keyset pagination on seq: the last seq read is the next page's lower
	// bound, so events written meanwhile with a higher seq may be included,
	// and the count only estimates the total. A page ends at BatchSize rows
	// or PageBytes bytes (sizes are read without detoasting the payloads),
	// whichever comes first, and holds at least one row.
	cols := `event_id, seq, event_target, event_type, entity_type, entity_id, event_data, headers, attempts, created_at`
	page := `SELECT ` + cols + ` FROM (
			SELECT ` + cols + `, ` + rowBytesSQL("e") + ` AS size,
				sum(` + rowBytesSQL("e") + `) OVER (ORDER BY seq ROWS UNBOUNDED PRECEDING) AS running
			FROM ` + t + ` e WHERE ` + where + fmt.Sprintf(` AND seq > $%d ORDER BY seq LIMIT $%d`, len(args)+1, len(args)+2) + `) p
		WHERE ` + fmt.Sprintf(`p.running <= $%d OR p.running = p.size`, len(args)+3) + `
		ORDER BY seq`
	r := replayer{js: js, o: o, res: &res}
	var last int64
	for {
		rows, err := readReplayPage(ctx, db, page, append(args, last, o.BatchSize, o.PageBytes))
		if err != nil {
			return res, err
		}
		if len(rows) == 0 {
			return res, nil
		}
		for i := range rows {
			if err := r.send(ctx, &rows[i]); err != nil {
				return res, err
			}
		}
		if err := r.wait(ctx, 0); err != nil {
			return res, err
		}
		progress(res.Published, max(res.Selected, res.Published))
		last = rows[len(rows)-1].seq
	}
}

// where returns the SQL condition selecting f's SUCCESS events.
func (f ReplayFilter) where() (string, []any, error) {
	w := `event_status = 'SUCCESS'`
	var args []any
	add := func(cond string, v any) {
		args = append(args, v)
		w += fmt.Sprintf(" AND "+cond, len(args))
	}
	set := false
	if f.EntityType != "" || f.EntityID != "" {
		if f.EntityType == "" || f.EntityID == "" {
			return "", nil, errors.New("an entity needs both a type and an id")
		}
		add(`entity_type = $%d`, f.EntityType)
		add(`entity_id = $%d`, f.EntityID)
		set = true
	}
	if f.FromSeq < 0 || f.ToSeq < 0 || f.ToSeq > 0 && f.FromSeq > f.ToSeq {
		return "", nil, fmt.Errorf("seq range %d..%d is empty or negative", f.FromSeq, f.ToSeq)
	}
	if f.FromSeq > 0 {
		add(`seq >= $%d`, f.FromSeq)
		set = true
	}
	if f.ToSeq > 0 {
		add(`seq <= $%d`, f.ToSeq)
		set = true
	}
	if !f.Since.IsZero() {
		add(`created_at >= $%d`, f.Since)
		set = true
	}
	if !f.Until.IsZero() {
		add(`created_at < $%d`, f.Until)
		set = true
	}
	if !set {
		return "", nil, errors.New("choose events by entity, seq range or time range")
	}
	return w, args, nil
}

func readReplayPage(ctx context.Context, db *sql.DB, q string, args []any) ([]row, error) {
	rows, err := db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("read events to replay: %w", err)
	}
	out, err := scanRows(rows)
	if err != nil {
		return nil, fmt.Errorf("read events to replay: %w", err)
	}
	return out, nil
}

// replayer sends replayed messages with a bounded number in flight.
type replayer struct {
	js      jetstream.JetStream
	o       ReplayOptions
	res     *ReplayResult
	pending []replayed
}

type replayed struct {
	id, subject string
	seq         int64
	paf         jetstream.PubAckFuture
}

func (r *replayer) send(ctx context.Context, ev *row) error {
	// The message as replayed (prefixed subject, replay message id and
	// header) is checked against the rule as a whole: a prefix that makes
	// the protocol line too long would make the server close the
	// connection.
	w, err := wireEvent(ev)
	if err != nil {
		return fmt.Errorf("replay event %s (seq %d): %w", ev.id, ev.seq, err)
	}
	if r.o.SubjectPrefix != "" {
		w.Subject = r.o.SubjectPrefix + "." + cmp.Or(w.Subject, w.EntityType+"."+w.Type)
	}
	w.Replay = r.o.RunID
	msg, _, err := wire.Build(w, int(r.js.Conn().MaxPayload()), r.o.MaxControlLine)
	if err != nil {
		return fmt.Errorf("replay event %s (seq %d) cannot be published: %w", ev.id, ev.seq, err)
	}
	if err := r.wait(ctx, r.o.MaxInFlight-1); err != nil {
		return err
	}
	// No retry inside the client: its timers would store an entity's events
	// out of order (see noClientRetry); a failure stops the replay instead.
	paf, err := r.js.PublishMsgAsync(msg, noClientRetry)
	if err != nil {
		return fmt.Errorf("replay event %s (seq %d) to %q: %w", ev.id, ev.seq, msg.Subject, err)
	}
	r.pending = append(r.pending, replayed{id: ev.id, subject: msg.Subject, seq: ev.seq, paf: paf})
	return nil
}

// wait waits for the oldest acks until at most keep messages are in
// flight.
func (r *replayer) wait(ctx context.Context, keep int) error {
	for len(r.pending) > keep {
		p := r.pending[0]
		timer := time.NewTimer(r.o.AckTimeout)
		select {
		case ack := <-p.paf.Ok():
			r.res.Published++
			if ack.Duplicate {
				r.res.Duplicates++
			}
		case err := <-p.paf.Err():
			timer.Stop()
			reason := err.Error()
			if errors.Is(err, jetstream.ErrNoStreamResponse) {
				reason = fmt.Sprintf("no JetStream stream covers subject %q (or it is unavailable)", p.subject)
			}
			return fmt.Errorf("replay event %s (seq %d) to %q: %w: %s", p.id, p.seq, p.subject, ErrReplayRefused, reason)
		case <-timer.C:
			return fmt.Errorf("replay event %s (seq %d) to %q: no PubAck within %s", p.id, p.seq, p.subject, r.o.AckTimeout)
		case <-ctx.Done():
			timer.Stop()
			return fmt.Errorf("replay stopped before event %s (seq %d) was acknowledged: %w", p.id, p.seq, ctx.Err())
		}
		timer.Stop()
		r.pending = r.pending[1:]
	}
	return nil
}
