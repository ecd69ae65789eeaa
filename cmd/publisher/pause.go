package main

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"os"
	"os/user"

	"github.com/pgnats/outbox/internal/poller"
)

func runPause(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return setPause(ctx, "pause", true, args, stdout, `
Pause publishing: every publisher of the table, single leader or
partitioned, stops claiming events within about a second, after finishing
the batch it has in flight. Writers go on; new events stay READY. The
publishers stay up and ready, and the switch persists (in the table's
_control table) until 'publisher resume'. Needs schema version 4
('publisher migrate').`)
}

func runResume(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return setPause(ctx, "resume", false, args, stdout, `
Resume publishing after 'publisher pause': the publishers claim again within
about a second, in order, from the oldest READY event.`)
}

// setPause sets the pause switch for the pause and resume commands.
func setPause(ctx context.Context, name string, paused bool, args []string, stdout io.Writer, usage string) error {
	var (
		o  common
		by string
	)
	c := newCommand(name, "", usage)
	o.register(c)
	c.String(&by, "by", "", "who is recorded as having done it (default: the OS user name)")
	if err := c.parse(args, stdout); err != nil {
		return err
	}
	if by == "" {
		by = cmp.Or(os.Getenv("USER"), "cli")
		if u, err := user.Current(); err == nil && u.Username != "" {
			by = u.Username
		}
	}
	db, err := openDB(ctx, o.databaseURL)
	if err != nil {
		return err
	}
	defer db.Close()
	if err := poller.SetPause(ctx, db, o.table, paused, by); err != nil {
		return err
	}
	if paused {
		fmt.Fprintf(stdout, "publishing paused by %s: publishers stop claiming within a second\n", by)
	} else {
		fmt.Fprintf(stdout, "publishing resumed by %s\n", by)
	}
	return nil
}
