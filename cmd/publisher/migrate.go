package main

import (
	"context"
	"fmt"
	"io"

	"github.com/pgnats/outbox/schema"
)

func runMigrate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var (
		o         common
		processed string
		print     bool
	)
	c := newCommand("migrate", "", `
Create or upgrade the outbox tables: the events table with its indexes and
NOTIFY trigger, and the processed_message table that pkg/dedup uses. Applied
versions are recorded in <table>_migrations; running it again is a no-op, or
resumes a migration that was interrupted (big tables are converted in
batches of short transactions). An existing table of a configured name that
the outbox could not have created is refused, naming what is wrong.
With --print, write the SQL to stdout instead, for your own migration tool.`)
	o.register(c)
	c.String(&processed, "processed-table", schema.DefaultProcessed, "table pkg/dedup records handled messages in")
	c.Bool(&print, "print", false, "print the SQL instead of applying it")
	if err := c.parse(args, stdout); err != nil {
		return err
	}
	tables := schema.Tables{Events: o.table, Processed: processed}
	if err := tables.Validate(); err != nil {
		return usagef("migrate: %v", err)
	}
	if print {
		sql, err := schema.Script(tables)
		if err != nil {
			return err
		}
		_, err = io.WriteString(stdout, sql)
		return err
	}
	db, err := openDB(ctx, o.databaseURL)
	if err != nil {
		return err
	}
	defer db.Close()
	applied, err := schema.Migrate(ctx, db, tables)
	if err != nil {
		return err
	}
	if len(applied) == 0 {
		fmt.Fprintf(stdout, "schema is up to date (tables %s, %s)\n", tables.Events, tables.Processed)
		return nil
	}
	for _, v := range applied {
		fmt.Fprintf(stdout, "applied migration %04d\n", v)
	}
	return nil
}
