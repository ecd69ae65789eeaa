package integration

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// requeueFixture writes one event for each of the entities order/e1 to
// order/e6 and makes them FAILED with these ages and errors; e6 is SUCCESS,
// so no filter may select it. It returns the event ids by entity.
func requeueFixture(t *testing.T) (*bundle, map[string]string) {
	t.Helper()
	prefix := "t" + testenv.Suffix()
	b := newBundle(t, nil, "", prefix)
	rows := []struct {
		entity, age, status, lastError string
	}{
		{"e1", "3 hours", "FAILED", `no JetStream stream covers subject "orders.created"`},
		{"e2", "3 hours", "FAILED", "message is over the 50%_limit"},
		{"e3", "30 minutes", "FAILED", `NO JETSTREAM STREAM covers subject "orders.updated"`},
		{"e4", "30 minutes", "FAILED", "quota 50%_LIMIT reached"},
		{"e5", "1 minute", "FAILED", "quota 50ab reached"}, // matches 50%_ only as a pattern
		{"e6", "3 hours", "SUCCESS", "no JetStream stream covers subject"},
	}
	tx, err := b.db.Beginx()
	require.NoError(t, err)
	var events []outbox.Event
	for _, r := range rows {
		events = append(events, outbox.Event{EntityType: "order", EntityID: r.entity, Type: "OrderUpdated",
			Subject: prefix + ".order.updated", Data: payload{Entity: r.entity, N: 1}})
	}
	ids, err := b.w.Write(t.Context(), tx, events...)
	require.NoError(t, err)
	require.NoError(t, tx.Commit())
	byEntity := map[string]string{}
	for i, r := range rows {
		_, err := b.db.Exec(`UPDATE events SET event_status = $2, attempts = 3, last_error = $3,
			created_at = now() - $4::interval WHERE event_id = $1`, ids[i].String(), r.status, r.lastError, r.age)
		require.NoError(t, err)
		byEntity[r.entity] = ids[i].String()
	}
	return b, byEntity
}

// TestRequeueFilters runs `publisher requeue` with time range and error
// text filters, alone and combined.
func TestRequeueFilters(t *testing.T) {
	t.Parallel()

	t.Run("dry run counts", func(t *testing.T) {
		t.Parallel()
		b, _ := requeueFixture(t)
		fourHoursAgo := time.Now().Add(-4 * time.Hour).UTC().Format(time.RFC3339)
		oneHourAgo := time.Now().Add(-time.Hour).UTC().Format(time.RFC3339)
		for _, tc := range []struct {
			name string
			args []string
			want string
		}{
			{"since a duration ago", []string{"--since", "1h"}, "would requeue 3 FAILED events\n"},
			{"until a duration ago", []string{"--until", "1h"}, "would requeue 2 FAILED events\n"},
			{"RFC 3339 range", []string{"--since", fourHoursAgo, "--until", oneHourAgo}, "would requeue 2 FAILED events\n"},
			{"error text ignores case", []string{"--error-contains", "no jetstream stream"}, "would requeue 2 FAILED events\n"},
			{"error text with % and _ matched literally", []string{"--error-contains", "50%_"}, "would requeue 2 FAILED events\n"},
			{"time range and error text", []string{"--since", "1h", "--error-contains", "no jetstream"}, "would requeue 1 FAILED event\n"},
			{"entity and error text", []string{"--entity", "order/e1", "--error-contains", "50%_"}, "would requeue 0 FAILED events\n"},
			{"everything", []string{"--all"}, "would requeue 5 FAILED events\n"},
		} {
			r := requireCLI(t, append([]string{"requeue", "--dry-run", "--database-url", b.db.DSN}, tc.args...)...)
			require.Equal(t, tc.want, r.stdout, "%s: requeue --dry-run %v", tc.name, tc.args)
		}
		require.Equal(t, 5, b.db.Count(t, "FAILED"), "dry runs change nothing")
	})

	t.Run("combined filters requeue only the matching events", func(t *testing.T) {
		t.Parallel()
		b, ids := requeueFixture(t)
		r := requireCLI(t, "requeue", "--since", "2h", "--error-contains", "50%_limit", "--database-url", b.db.DSN)
		require.Equal(t, "requeued 1 FAILED event\n", r.stdout)
		require.Equal(t, []string{ids["e4"]}, b.db.IDs(t, "READY"))
		var attempts int
		require.NoError(t, b.db.Get(&attempts, `SELECT attempts FROM events WHERE event_id = $1`, ids["e4"]))
		require.Zero(t, attempts, "attempts reset")

		r = requireCLI(t, "requeue", "--until", "1h", "--database-url", b.db.DSN)
		require.Equal(t, "requeued 2 FAILED events\n", r.stdout)
		require.ElementsMatch(t, []string{ids["e1"], ids["e2"], ids["e4"]}, b.db.IDs(t, "READY"))
		require.Equal(t, 1, b.db.Count(t, "SUCCESS"), "a SUCCESS event is never requeued")
	})

	t.Run("usage errors exit 2", func(t *testing.T) {
		t.Parallel()
		for _, tc := range []struct {
			args   []string
			stderr string
		}{
			{[]string{"requeue", "--all", "--since", "1h"}, "--all selects every FAILED event"},
			{[]string{"requeue", "--id", "x", "--entity", "order/1", "--since", "1h"}, "exactly one of --id, --entity or --all"},
			{[]string{"requeue", "--since", "yesterday"}, `--since "yesterday": use an RFC 3339 time`},
			{[]string{"requeue", "--since", "1h", "--until", "2h"}, "is not before --until"},
			{[]string{"requeue", "--dry-run"}, "or with --since, --until or --error-contains"},
		} {
			r := cli(t, append(tc.args, "--database-url", unreachableDSN)...)
			require.Equal(t, 2, r.code, "%v: exit status; stderr:\n%s", tc.args, r.stderr)
			require.Contains(t, r.stderr, tc.stderr, "%v", tc.args)
		}
	})
}

// Ids and entities are found however they are written: an event id in
// upper case (as some tools print UUIDs) and an entity whose type holds a
// slash, chosen with --entity-type and --entity-id. An id that is no UUID
// is a usage error naming it, not zero events requeued.
func TestRequeueFindsIdsAndEntitiesAsWritten(t *testing.T) {
	t.Parallel()
	prefix := "t" + testenv.Suffix()
	b := newBundle(t, nil, "", prefix)
	tx, err := b.db.Beginx()
	require.NoError(t, err)
	ids, err := b.w.Write(t.Context(), tx,
		outbox.Event{EntityType: "order", EntityID: "e1", Type: "OrderUpdated", Subject: prefix + ".order.updated", Data: payload{Entity: "e1"}},
		outbox.Event{EntityType: "billing/invoice", EntityID: "7", Type: "InvoiceIssued", Subject: prefix + ".invoice.issued", Data: payload{Entity: "7"}},
		outbox.Event{EntityType: "billing", EntityID: "invoice/7", Type: "InvoiceIssued", Subject: prefix + ".invoice.issued", Data: payload{Entity: "i7"}})
	require.NoError(t, err)
	require.NoError(t, tx.Commit())
	b.db.MustExec(`UPDATE events SET event_status = 'FAILED', attempts = 3, last_error = 'x'`)

	r := requireCLI(t, "requeue", "--dry-run", "--id", strings.ToUpper(ids[0].String()), "--database-url", b.db.DSN)
	require.Equal(t, "would requeue 1 FAILED event\n", r.stdout, "an upper-case id")
	r = requireCLI(t, "requeue", "--dry-run", "--id", "{"+ids[0].String()+"}", "--database-url", b.db.DSN)
	require.Equal(t, "would requeue 1 FAILED event\n", r.stdout, "a braced id")

	r = requireCLI(t, "requeue", "--entity-type", "billing/invoice", "--entity-id", "7", "--database-url", b.db.DSN)
	require.Equal(t, "requeued 1 FAILED event\n", r.stdout, "an entity type with a slash")
	require.Equal(t, []string{ids[1].String()}, b.db.IDs(t, "READY"))
	r = requireCLI(t, "requeue", "--entity", "billing/invoice/7", "--database-url", b.db.DSN)
	require.Equal(t, "requeued 1 FAILED event\n", r.stdout, "--entity splits at the first slash: billing, invoice/7")
	require.ElementsMatch(t, []string{ids[1].String(), ids[2].String()}, b.db.IDs(t, "READY"))

	for _, tc := range []struct {
		args   []string
		stderr string
	}{
		{[]string{"requeue", "--id", "not-a-uuid"}, `--id "not-a-uuid": not an event id`},
		{[]string{"requeue", "--entity-type", "billing/invoice"}, "--entity-type and --entity-id go together"},
		{[]string{"requeue", "--entity", "order/1", "--entity-type", "order", "--entity-id", "1"}, "exactly one of"},
	} {
		r := cli(t, append(tc.args, "--database-url", unreachableDSN)...)
		require.Equal(t, 2, r.code, "%v: exit status; stderr:\n%s", tc.args, r.stderr)
		require.Contains(t, r.stderr, tc.stderr, "%v", tc.args)
	}
}
