package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgnats/outbox/internal/poller"
)

func runReplay(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var (
		o          common
		nopt       natsOptions
		entity     entityFlags
		fromSeq    int
		toSeq      int
		since      string
		until      string
		prefix     string
		batch      int
		batchBytes int
		ackTimeout time.Duration
		dryRun     bool
	)
	c := newCommand("replay", "", `
Publish SUCCESS events again, in seq order, to rebuild a consumer's state or
fill a new stream. Choose the events with --entity, --from-seq/--to-seq or
--since/--until (they combine: an event must match all). Each message has
the headers the publisher sets, with Nats-Msg-Id "<event id>:replay:<run
id>" so the stream's duplicate window lets it in, Outbox-Event-Id unchanged
so pkg/dedup still drops it for a consumer that processed the event, and
Outbox-Replay set to the run id. The events table is not changed. Progress
goes to stderr; the counts to stdout.`)
	o.register(c)
	nopt.register(c, "NATS server URL(s), comma-separated")
	entity.register(c, "the events")
	c.Int(&fromSeq, "from-seq", 0, "first seq to replay, inclusive (0: no lower bound)")
	c.Int(&toSeq, "to-seq", 0, "last seq to replay, inclusive (0: no upper bound)")
	c.String(&since, "since", "", "only events created at or after this time: RFC 3339, or a duration ago (2h)")
	c.String(&until, "until", "", "only events created before this time: RFC 3339, or a duration ago (30m)")
	c.String(&prefix, "subject-prefix", "", "publish to PREFIX.<original subject> instead of the original subject")
	c.Int(&batch, "batch", 500, "events read from the table at once")
	c.Bytes(&batchBytes, "batch-bytes", poller.DefaultBatchBytes, "largest total `size` of the events (payloads and headers) read from the table at once: bytes, or a number with KiB, MiB or GiB; a larger event is read alone")
	c.Duration(&ackTimeout, "ack-timeout", 30*time.Second, "how long to wait for one PubAck before giving up")
	c.Bool(&dryRun, "dry-run", false, "only count the events that would be replayed")
	if err := c.parse(args, stdout); err != nil {
		return err
	}
	log, err := o.logger(stderr)
	if err != nil {
		return err
	}
	var f poller.ReplayFilter
	if f.EntityType, f.EntityID, err = entity.parse("replay"); err != nil {
		return err
	}
	if fromSeq < 0 || toSeq < 0 || toSeq > 0 && fromSeq > toSeq {
		return usagef("replay: --from-seq %d --to-seq %d: give seqs of at least 1, the first not after the last", fromSeq, toSeq)
	}
	f.FromSeq, f.ToSeq = int64(fromSeq), int64(toSeq)
	if f.Since, f.Until, err = parseRange("replay", since, until, time.Now()); err != nil {
		return err
	}
	if !entity.given() && fromSeq == 0 && toSeq == 0 && f.Since.IsZero() && f.Until.IsZero() {
		return usagef("replay: choose events with --entity, --from-seq/--to-seq or --since/--until")
	}
	if batch < 1 {
		return usagef("replay: --batch must be at least 1")
	}
	if ackTimeout <= 0 {
		return usagef("replay: --ack-timeout must be positive, got %s", ackTimeout)
	}
	if err := checkSubjectPrefix(prefix); err != nil {
		return err
	}
	if err := nopt.check("replay"); err != nil {
		return err
	}
	db, err := openDB(ctx, o.databaseURL)
	if err != nil {
		return err
	}
	defer db.Close()
	opts := poller.ReplayOptions{SubjectPrefix: prefix, BatchSize: batch, PageBytes: batchBytes, AckTimeout: ackTimeout, DryRun: dryRun,
		MaxControlLine: nopt.maxControlLine}
	if dryRun {
		res, err := poller.Replay(ctx, db, nil, o.table, f, opts, nil)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "would replay %d SUCCESS events\n", res.Selected)
		return nil
	}
	nc, err := connectNATS(nopt, false, log, nil)
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	opts.RunID = uuid.NewString()
	log.Info("replay starting", "run_id", opts.RunID, "table", o.table, "subject_prefix", prefix)
	bar := newProgress(stderr)
	res, err := poller.Replay(ctx, db, js, o.table, f, opts, bar.update)
	bar.done()
	if err != nil {
		return fmt.Errorf("%w\n  %d of %d events were replayed before the stop (run id %s); fix the cause and run the replay again",
			err, res.Published, res.Selected, opts.RunID)
	}
	fmt.Fprintf(stdout, "replayed %d SUCCESS events (run id %s)", res.Published, opts.RunID)
	if res.Duplicates > 0 {
		fmt.Fprintf(stdout, ", %d of them dropped by the stream as duplicates", res.Duplicates)
	}
	fmt.Fprintln(stdout)
	return nil
}

// checkSubjectPrefix rejects a --subject-prefix that would not make a
// valid literal subject: empty tokens, wildcards or white space.
func checkSubjectPrefix(p string) error {
	if p == "" {
		return nil
	}
	for _, tok := range strings.Split(p, ".") {
		if tok == "" || tok == "*" || tok == ">" || strings.ContainsAny(tok, " \t\r\n") {
			return usagef("replay: --subject-prefix %q: use dot-separated tokens without wildcards or spaces, e.g. replay.billing", p)
		}
	}
	return nil
}

// progress shows a replay's progress on stderr: a bar redrawn in place on
// a terminal, else a line at every 10%.
type progress struct {
	w      io.Writer
	tty    bool
	shown  bool
	lastPc int64
}

func newProgress(w io.Writer) *progress {
	p := &progress{w: w, lastPc: -1}
	if f, ok := w.(*os.File); ok {
		if fi, err := f.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
			p.tty = true
		}
	}
	return p
}

func (p *progress) update(done, total int64) {
	if total <= 0 {
		return
	}
	pc := done * 100 / total
	if p.tty {
		const width = 40
		n := int(done * width / total)
		fmt.Fprintf(p.w, "\r[%s%s] %3d%% %d/%d", strings.Repeat("#", n), strings.Repeat(" ", width-n), pc, done, total)
		p.shown = true
		return
	}
	if pc/10 > p.lastPc/10 || p.lastPc < 0 {
		fmt.Fprintf(p.w, "replay: %d/%d events (%d%%)\n", done, total, pc)
		p.lastPc = pc
	}
}

func (p *progress) done() {
	if p.tty && p.shown {
		fmt.Fprintln(p.w)
	}
}
