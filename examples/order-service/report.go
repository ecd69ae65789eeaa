package main

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
)

// result is what the saga left behind.
type result struct {
	orders     map[string]order
	reserved   map[string]int64
	written    int64            // events in both outboxes
	published  int64            // events the publishers published
	duplicates int64            // deliveries dedup skipped
	processed  map[string]int64 // messages handled, by consumer
}

// report prints the orders and a summary, and returns an error listing
// every way the result differs from what must have happened.
func report(out io.Writer, sc scenario, r result) error {
	var diffs []string
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "order\tcustomer\tamount\tstatus\texpected")
	n := map[string]int{}
	for _, want := range sc.orders {
		got, ok := r.orders[want.id]
		if !ok {
			got.Status = "missing"
		}
		n[got.Status]++
		mark := ""
		if got.Status != want.want {
			mark = "  <- differs"
			diffs = append(diffs, fmt.Sprintf("order %s is %s, want %s", want.id, got.Status, want.want))
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s%s\n", want.id, want.customer, want.amount, got.Status, want.want, mark)
	}
	if err := tw.Flush(); err != nil {
		return err
	}

	wantEvents := int64(2 * len(sc.orders)) // an OrderCreated and an answer each
	wantReserved := sc.wantReserved()
	ids := slices.Sorted(maps.Keys(wantReserved))
	var gotRes, wantRes []string
	for _, id := range ids {
		gotRes = append(gotRes, fmt.Sprintf("%s=%d", id, r.reserved[id]))
		wantRes = append(wantRes, fmt.Sprintf("%s=%d", id, wantReserved[id]))
		if r.reserved[id] != wantReserved[id] {
			diffs = append(diffs, fmt.Sprintf("customer %s has %d credit reserved, want %d", id, r.reserved[id], wantReserved[id]))
		}
	}
	fmt.Fprintf(out, "summary: orders approved %d (want %d), rejected %d (want %d), events published %d (want %d), "+
		"duplicates skipped %d (want 1), credit reserved %s (want %s)\n",
		n[approved], sc.want(approved), n[rejected], sc.want(rejected), r.published, wantEvents,
		r.duplicates, strings.Join(gotRes, " "), strings.Join(wantRes, " "))

	if r.written != wantEvents {
		diffs = append(diffs, fmt.Sprintf("%d events written to the outboxes, want %d", r.written, wantEvents))
	}
	if r.published != wantEvents {
		diffs = append(diffs, fmt.Sprintf("%d events published, want %d", r.published, wantEvents))
	}
	if r.duplicates != 1 {
		diffs = append(diffs, fmt.Sprintf("%d duplicate deliveries skipped, want 1", r.duplicates))
	}
	for _, name := range slices.Sorted(maps.Keys(r.processed)) {
		if got := r.processed[name]; got != int64(len(sc.orders)) {
			diffs = append(diffs, fmt.Sprintf("%s processed %d messages, want %d", name, got, len(sc.orders)))
		}
	}
	if len(diffs) > 0 {
		return fmt.Errorf("the saga did not end as it must:\n  - %s", strings.Join(diffs, "\n  - "))
	}
	fmt.Fprintln(out, "ok: every order ended as it must; each event was published once and handled once; the duplicate changed nothing")
	return nil
}
