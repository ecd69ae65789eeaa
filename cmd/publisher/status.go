package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/pgnats/outbox/internal/poller"
)

func runStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var (
		o        common
		asJSON   bool
		limit    int
		watch    bool
		interval time.Duration
	)
	c := newCommand("status", "", `
Show the state of the events table: counts per status, the READY backlog and
the age of its oldest event, entities blocked by a FAILED event or one
waiting for a retry not yet due (with the event that blocks each), the most recent FAILED events with their
reasons, and which session holds the leader lock.

With --watch, refresh every --interval until interrupted: on a terminal the
screen is redrawn, otherwise each refresh is printed as a new block (with
--json, one JSON object a line).`)
	o.register(c)
	c.Bool(&asJSON, "json", false, "print one JSON object instead of tables")
	c.Int(&limit, "limit", 10, "most blocked entities and FAILED events listed")
	c.Bool(&watch, "watch", false, "refresh every --interval until interrupted")
	c.Duration(&interval, "interval", 2*time.Second, "with --watch: time between refreshes")
	if err := c.parse(args, stdout); err != nil {
		return err
	}
	if limit < 1 {
		return usagef("status: --limit must be at least 1")
	}
	if interval <= 0 {
		return usagef("status: --interval must be positive, got %s", interval)
	}
	db, err := openDB(ctx, o.databaseURL)
	if err != nil {
		return err
	}
	defer db.Close()
	read := func(ctx context.Context) (*poller.Status, error) { return poller.ReadStatus(ctx, db, o.table, limit) }
	if watch {
		return watchStatus(ctx, stdout, stderr, watchOptions{every: interval, tty: isTerminal(stdout), json: asJSON}, read)
	}
	st, err := read(ctx)
	if err != nil {
		return err
	}
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	printStatus(stdout, st)
	return nil
}

// watchOptions shape the output of status --watch.
type watchOptions struct {
	every time.Duration
	tty   bool // redraw the screen instead of printing blocks one after another
	json  bool // one JSON object a line
}

// clearScreen moves the cursor home and clears the screen (ANSI).
const clearScreen = "\x1b[H\x1b[2J"

// watchStatus prints the status every o.every until ctx ends, then returns
// nil. A failed read is reported (on stderr with JSON, in place of the
// table otherwise) and tried again at the next refresh.
func watchStatus(ctx context.Context, stdout, stderr io.Writer, o watchOptions,
	read func(context.Context) (*poller.Status, error)) error {
	t := time.NewTicker(o.every)
	defer t.Stop()
	for {
		st, err := read(ctx)
		if ctx.Err() != nil {
			return nil
		}
		var frame bytes.Buffer
		switch {
		case o.json && err != nil:
			fmt.Fprintf(stderr, "publisher status: %v\n", err)
		case o.json:
			if err := json.NewEncoder(&frame).Encode(st); err != nil {
				return err
			}
		default:
			if o.tty {
				frame.WriteString(clearScreen)
			}
			fmt.Fprintf(&frame, "status at %s (every %s, Ctrl-C to stop)\n\n",
				time.Now().UTC().Format(time.RFC3339), o.every)
			if err != nil {
				fmt.Fprintf(&frame, "could not read the status: %v\n", err)
			} else {
				printStatus(&frame, st)
			}
			if !o.tty {
				frame.WriteString("\n")
			}
		}
		if _, err := stdout.Write(frame.Bytes()); err != nil {
			return err // the reader went away (a closed pipe)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	if u, ok := w.(interface{ Unwrap() io.Writer }); ok {
		w = u.Unwrap() // a scrubbing writer over the terminal
	}
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

func printStatus(w io.Writer, st *poller.Status) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "table\t%s\n", st.Table)
	fmt.Fprintf(tw, "READY\t%d\t(%d waiting for a retry)\n", st.Counts["READY"], st.Retrying)
	fmt.Fprintf(tw, "SUCCESS\t%d\n", st.Counts["SUCCESS"])
	fmt.Fprintf(tw, "FAILED\t%d\n", st.Counts["FAILED"])
	age := "-"
	if st.OldestReadyAge != nil {
		age = st.OldestReadyAge.Round(time.Millisecond).String()
	}
	fmt.Fprintf(tw, "oldest READY\t%s\n", age)
	leader := "none (no publisher is running)"
	if st.Leader != nil {
		leader = fmt.Sprintf("backend pid %d", st.Leader.PID)
		if st.Leader.ClientAddr != "" {
			leader += " from " + st.Leader.ClientAddr
		}
		if st.Leader.BackendSince != nil {
			leader += ", since " + st.Leader.BackendSince.UTC().Format(time.RFC3339)
		}
	}
	if len(st.Replicas) == 0 || st.Leader != nil {
		fmt.Fprintf(tw, "leader\t%s\n", leader)
	}
	fmt.Fprintf(tw, "blocked entities\t%d\n", st.BlockedTotal)
	fmt.Fprintf(tw, "publishing\t%s\n", pauseLine(st.Pause))
	tw.Flush()

	if len(st.Replicas) > 0 {
		fmt.Fprintln(w, "\nPartitioned publishers (--partitions):")
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "REPLICA\tPARTITIONS\tHOLDS\tLAST SEEN")
		for _, r := range st.Replicas {
			fmt.Fprintf(tw, "%s\t%d\t%d: %s\t%s\n", r.ID, r.Partitions, len(r.Held),
				strings.Trim(fmt.Sprint(r.Held), "[]"), r.SeenAt.UTC().Format(time.RFC3339))
		}
		tw.Flush()
	}

	if len(st.Blocked) > 0 {
		fmt.Fprintln(w, "\nBlocked entities (their later events wait):")
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ENTITY\tBLOCKED BY\tSTATUS\tATTEMPTS\tWAITING\tREASON")
		for _, b := range st.Blocked {
			status := b.Status
			if status == "READY" {
				status = "retry at " + b.RetryAt.UTC().Format(time.TimeOnly)
			}
			fmt.Fprintf(tw, "%s/%s\t%s\t%s\t%d\t%d\t%s\n", b.EntityType, b.EntityID, b.EventID, status,
				b.Attempts, b.Waiting, oneLine(b.LastError))
		}
		tw.Flush()
	}
	if len(st.RecentFailed) > 0 {
		fmt.Fprintln(w, "\nRecent FAILED events (publisher requeue --id ID puts one back):")
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "EVENT\tSUBJECT\tENTITY\tATTEMPTS\tREASON")
		for _, f := range st.RecentFailed {
			fmt.Fprintf(tw, "%s\t%s\t%s/%s\t%d\t%s\n", f.EventID, f.Subject, f.EntityType, f.EntityID,
				f.Attempts, oneLine(f.LastError))
		}
		tw.Flush()
	}
}

func oneLine(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 100 {
		s = s[:97] + "..."
	}
	return s
}

// pauseLine describes the pause switch: "active", or "PAUSED by who since
// when".
func pauseLine(p poller.PauseInfo) string {
	if !p.Paused {
		return "active"
	}
	s := "PAUSED"
	if p.By != "" {
		s += " by " + p.By
	}
	if p.At != nil {
		s += " since " + p.At.UTC().Format(time.RFC3339)
	}
	return s + " ('publisher resume' resumes)"
}
