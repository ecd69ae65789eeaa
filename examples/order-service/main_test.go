package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"regexp"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
)

const wantSummary = "summary: orders approved 3 (want 3), rejected 2 (want 2), events published 10 (want 10), " +
	"duplicates skipped 1 (want 1), credit reserved alice=80 bob=20 (want alice=80 bob=20)"

// closedDatabaseURL points at a port where no PostgreSQL listens.
const closedDatabaseURL = "postgres://postgres@127.0.0.1:1/test?sslmode=disable"

func TestRun(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		args       []string
		wantOut    []string // besides the summary
		notWantOut []string
	}{
		{
			name:       "local PostgreSQL and NATS",
			args:       []string{"--database-url", testenv.DatabaseURL(), "--nats-url", testenv.NATSURL()},
			notWantOut: []string{"throwaway", "in-process"}, // the local servers must answer
		},
		{
			name:    "in-process NATS when none answers",
			args:    []string{"--database-url", testenv.DatabaseURL(), "--nats-url", "nats://127.0.0.1:1"},
			wantOut: []string{"NATS: no JetStream at nats://127.0.0.1:1", "(in-process server, JetStream in "},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			out := runDemo(t, tt.args...)
			for _, s := range tt.wantOut {
				require.Contains(t, out, s)
			}
			for _, s := range tt.notWantOut {
				require.NotContains(t, out, s)
			}
		})
	}
}

func TestRunStartsThrowawayPostgres(t *testing.T) {
	t.Parallel()
	if _, ok := (binSearch{Path: os.Getenv("PATH"), Globs: postgresBinGlobs}).find(); !ok {
		t.Skip("no PostgreSQL server binaries (initdb, pg_ctl) installed; TestOpenPostgresWithoutBinaries covers this case")
	}
	out := runDemo(t, "--database-url", closedDatabaseURL, "--nats-url", testenv.NATSURL())
	require.Contains(t, out, "PostgreSQL: none answers at "+closedDatabaseURL)
	require.Contains(t, out, "starting a throwaway cluster with ")

	m := regexp.MustCompile(`stopped and removed the throwaway PostgreSQL cluster in (\S+)`).FindStringSubmatch(out)
	require.NotNil(t, m, "the cluster must be removed")
	require.NoDirExists(t, m[1])
}

// runDemo runs the demo with args, requires it to succeed with the expected
// summary, and returns its output.
func runDemo(t *testing.T, args ...string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	err := run(context.Background(), append([]string{"--timeout", "60s"}, args...), &stdout, &stderr)
	require.NoError(t, err, "stdout:\n%s\nstderr:\n%s", &stdout, &stderr)
	require.Contains(t, stdout.String(), wantSummary)
	require.Contains(t, stdout.String(), "ok: every order ended as it must")
	return stdout.String()
}

func TestOpenPostgresWithoutBinaries(t *testing.T) {
	t.Parallel()
	empty := t.TempDir()
	bins := binSearch{Path: empty, Globs: []string{filepath.Join(empty, "*", "bin")}}

	pg, err := openPostgres(context.Background(), closedDatabaseURL, bins, new(bytes.Buffer))
	require.Nil(t, pg)
	require.ErrorContains(t, err, "none answers at "+closedDatabaseURL)
	require.ErrorContains(t, err, "no initdb and pg_ctl")
	require.ErrorContains(t, err, filepath.Join(empty, "*", "bin"), "the error says where it looked")
	require.ErrorContains(t, err, "apt-get install postgresql", "the error says how to get one")
}

func TestBinSearchFind(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	install := func(dir string, names ...string) string {
		full := filepath.Join(root, dir)
		require.NoError(t, os.MkdirAll(full, 0o755))
		for _, n := range names {
			require.NoError(t, os.WriteFile(filepath.Join(full, n), []byte("#!/bin/sh\n"), 0o755))
		}
		return full
	}
	install("pg/9.6/bin", "initdb", "pg_ctl")
	v15 := install("pg/15/bin", "initdb", "pg_ctl")
	onPath := install("path/bin", "initdb", "pg_ctl")
	partial := install("partial/bin", "initdb")
	glob := filepath.Join(root, "pg", "*", "bin")

	tests := []struct {
		name   string
		search binSearch
		want   string // empty: not found
	}{
		{"newest version under a glob", binSearch{Globs: []string{glob}}, v15},
		{"PATH before the globs", binSearch{Path: partial + string(filepath.ListSeparator) + onPath, Globs: []string{glob}}, onPath},
		{"both tools required", binSearch{Path: partial}, ""},
		{"nothing to search", binSearch{}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := tt.search.find()
			require.Equal(t, tt.want, got)
			require.Equal(t, tt.want != "", ok)
		})
	}
}

func TestReportFlagsDifferences(t *testing.T) {
	t.Parallel()
	sc := creditLimitSaga()
	good := func() result {
		r := result{
			orders:     map[string]order{},
			reserved:   sc.wantReserved(),
			written:    10,
			published:  10,
			duplicates: 1,
			processed:  map[string]int64{"customer-service": 5, "order-service": 5},
		}
		for _, o := range sc.orders {
			r.orders[o.id] = order{ID: o.id, CustomerID: o.customer, Amount: o.amount, Status: o.want}
		}
		return r
	}

	var out bytes.Buffer
	require.NoError(t, report(&out, sc, good()))
	require.Contains(t, out.String(), wantSummary)

	tests := []struct {
		name   string
		change func(r *result)
		want   string
	}{
		{"order with the wrong status", func(r *result) { o := r.orders["o-3"]; o.Status = approved; r.orders["o-3"] = o }, "order o-3 is APPROVED, want REJECTED"},
		{"order still pending", func(r *result) { o := r.orders["o-1"]; o.Status = pending; r.orders["o-1"] = o }, "order o-1 is PENDING, want APPROVED"},
		{"order missing", func(r *result) { delete(r.orders, "o-5") }, "order o-5 is missing, want APPROVED"},
		{"credit reserved twice", func(r *result) { r.reserved["alice"] = 110 }, "customer alice has 110 credit reserved, want 80"},
		{"event published twice", func(r *result) { r.published = 11 }, "11 events published, want 10"},
		{"extra event written", func(r *result) { r.written = 11 }, "11 events written to the outboxes, want 10"},
		{"duplicate not skipped", func(r *result) { r.duplicates = 0 }, "0 duplicate deliveries skipped, want 1"},
		{"message processed twice", func(r *result) { r.processed["customer-service"] = 6 }, "customer-service processed 6 messages, want 5"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := good()
			tt.change(&r)
			err := report(new(bytes.Buffer), sc, r)
			require.ErrorContains(t, err, "the saga did not end as it must")
			require.ErrorContains(t, err, tt.want)
		})
	}
}

func TestRunRejectsBadCommandLine(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		args []string
	}{
		{"unknown flag", []string{"--nope"}},
		{"non-positive timeout", []string{"--timeout", "0s"}},
		{"extra argument", []string{"now"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			err := run(context.Background(), tt.args, &stdout, &stderr)
			require.ErrorAs(t, err, new(usageError))
			require.Empty(t, stdout.String(), "nothing runs")
		})
	}
}
