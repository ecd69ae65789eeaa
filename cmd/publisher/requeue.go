package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/pgnats/outbox/internal/poller"
)

func runRequeue(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var (
		o       common
		ids     string
		entity  entityFlags
		all     bool
		dryRun  bool
		since   string
		until   string
		errText string
	)
	c := newCommand("requeue", "", `
Put FAILED events back to READY with their attempts reset, so the publisher
tries them again at once (fix what made them fail first: create the missing
stream, raise the size limit). Choose the events with one of --id, --entity
or --all, or with the filters --since, --until and --error-contains; the
filters combine with each other and with --id or --entity (an event must
match all). Their entities stop being blocked; waiting events follow in
order.`)
	o.register(c)
	c.String(&ids, "id", "", "comma-separated event ids")
	entity.register(c, "every FAILED event")
	c.Bool(&all, "all", false, "every FAILED event")
	c.String(&since, "since", "", "only events created at or after this time: RFC 3339, or a duration ago (2h)")
	c.String(&until, "until", "", "only events created before this time: RFC 3339, or a duration ago (30m)")
	c.String(&errText, "error-contains", "", "only events whose last error contains this text (case-insensitive, matched literally)")
	c.Bool(&dryRun, "dry-run", false, "only count the events that would be requeued")
	if err := c.parse(args, stdout); err != nil {
		return err
	}
	var f poller.RequeueFilter
	chosen := 0
	if ids != "" {
		chosen++
	}
	if entity.given() {
		chosen++
	}
	if all {
		chosen++
		f.All = true
	}
	var err error
	if f.Since, f.Until, err = parseRange("requeue", since, until, time.Now()); err != nil {
		return err
	}
	f.ErrorContains = errText
	filtered := !f.Since.IsZero() || !f.Until.IsZero() || errText != ""
	switch {
	case chosen > 1 || chosen == 0 && !filtered:
		return usagef("requeue: choose events with exactly one of --id, --entity or --all, or with --since, --until or --error-contains")
	case all && filtered:
		return usagef("requeue: --all selects every FAILED event; drop it to filter with --since, --until or --error-contains")
	}
	for _, id := range strings.Split(ids, ",") {
		if id = strings.TrimSpace(id); id != "" {
			// Ids are matched as UUIDs, so any spelling of one finds the
			// event (upper case, braces) and the key's index is used.
			u, err := uuid.Parse(id)
			if err != nil {
				return usagef("requeue: --id %q: not an event id (a UUID)", id)
			}
			f.IDs = append(f.IDs, u.String())
		}
	}
	if f.EntityType, f.EntityID, err = entity.parse("requeue"); err != nil {
		return err
	}
	db, err := openDB(ctx, o.databaseURL)
	if err != nil {
		return err
	}
	defer db.Close()
	n, err := poller.Requeue(ctx, db, o.table, f, dryRun)
	if err != nil {
		return err
	}
	if dryRun {
		fmt.Fprintf(stdout, "would requeue %d FAILED %s\n", n, plural(n, "event"))
		return nil
	}
	fmt.Fprintf(stdout, "requeued %d FAILED %s\n", n, plural(n, "event"))
	return nil
}

// plural returns noun, with an "s" unless n is 1.
func plural[N int | int64](n N, noun string) string {
	if n == 1 {
		return noun
	}
	return noun + "s"
}
