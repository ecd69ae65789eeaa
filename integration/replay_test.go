package integration

import (
	"context"
	"encoding/json"
	"regexp"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/dedup"
)

// replayedLine is replay's report on stdout.
var replayedLine = regexp.MustCompile(`^replayed (\d+) SUCCESS events \(run id ([0-9a-f-]{36})\)\n$`)

// published writes count events for entities, publishes them with the
// publisher binary, stops it and returns the writer.
func published(t *testing.T, b *bundle, entities []string, count int) *seqWriter {
	t.Helper()
	s := b.writeAll(t, entities, count)
	p := startPublisher(t, "publisher", b.db.DSN)
	b.waitAllSuccess(t, count, 30*time.Second)
	p.Term()
	require.Zero(t, p.Wait(t, 15*time.Second))
	return s
}

// replay runs `publisher replay` and returns how many events it reported
// and the run id.
func replay(t *testing.T, b *bundle, args ...string) (int, string, result) {
	t.Helper()
	r := requireCLI(t, append([]string{"replay", "--database-url", b.db.DSN, "--nats-url", testenv.NATSURL()}, args...)...)
	m := replayedLine.FindStringSubmatch(r.stdout)
	require.NotNil(t, m, "replay output:\n%s", r.stdout)
	n, err := strconv.Atoi(m[1])
	require.NoError(t, err)
	return n, m[2], r
}

// eventIDs returns the ids of the events the query's WHERE clause selects,
// in seq order.
func (b *bundle) eventIDs(t *testing.T, where string, args ...any) []string {
	t.Helper()
	var ids []string
	require.NoError(t, b.db.Select(&ids, `SELECT event_id::text FROM events WHERE `+where+` ORDER BY seq`, args...))
	return ids
}

// requireReplayed checks that msgs are exactly the replay of ids, in that
// order: same event ids, Nats-Msg-Id "<event id>:replay:<run id>" and the
// Outbox-Replay header.
func requireReplayed(t *testing.T, msgs []streamMsg, ids []string, runID string) {
	t.Helper()
	got := make([]string, len(msgs))
	msgIDs := map[string]bool{}
	for i, m := range msgs {
		got[i] = m.eventID
		require.Equal(t, m.eventID+":replay:"+runID, m.msgID, "Nats-Msg-Id of a replayed event")
		require.Equal(t, runID, m.replay, "Outbox-Replay header")
		require.Equal(t, m.data.Entity, m.entity, "entity header matches the payload")
		msgIDs[m.msgID] = true
	}
	require.Equal(t, ids, got, "replayed event ids, in seq order")
	require.Len(t, msgIDs, len(msgs), "distinct Nats-Msg-Ids")
}

func TestReplay(t *testing.T) {
	t.Parallel()

	t.Run("entity to the same stream is processed once by pkg/dedup", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		const total = 60
		s := published(t, b, entityNames("r", 4), total)
		var delivered, processed atomic.Int64
		stop := startConsumers(t, b, "billing", []string{"billing"},
			func(ctx context.Context, tx *sqlx.Tx, msg jetstream.Msg) error {
				var p payload
				if err := json.Unmarshal(msg.Data(), &p); err != nil {
					return dedup.Permanent(err)
				}
				processed.Add(1)
				return nil
			}, &delivered)
		defer stop()
		testenv.Eventually(t, 30*time.Second, func() bool { return delivered.Load() == total },
			"consumer did not get the %d published events", total)

		n, runID, r := replay(t, b, "--entity", "order/r001")
		want := s.next["r001"]
		require.NotZero(t, want)
		require.Equal(t, want, n, "events replayed")
		require.Contains(t, r.stderr, "(100%)", "progress reaches 100%% on stderr")

		msgs := readStream(t, b.js, b.stream)
		require.Len(t, msgs, total+want, "the stream holds the originals and the replayed copies")
		requireEachOnce(t, msgs[:total], b.db.IDs(t, ""))
		requireReplayed(t, msgs[total:], b.eventIDs(t, `entity_id = 'r001'`), runID)

		testenv.Eventually(t, 30*time.Second, func() bool { return delivered.Load() == int64(total+want) },
			"consumer did not get the %d replayed copies", want)
		require.EqualValues(t, total, processed.Load(), "handler runs: pkg/dedup drops every replayed copy")
		require.Equal(t, total, b.db.Int(t, `SELECT count(*) FROM processed_message WHERE consumer_id = 'billing'`))
		require.Equal(t, map[string]int{"SUCCESS": total}, b.counts(t), "replay does not change the events table")

		// A second replay gets a new run id, so the stream takes it again.
		n2, runID2, _ := replay(t, b, "--entity", "order/r001")
		require.Equal(t, want, n2)
		require.NotEqual(t, runID, runID2)
	})

	t.Run("seq range with a subject prefix into a second stream", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		const total = 40
		published(t, b, entityNames("s", 3), total)
		rp := "r" + testenv.Suffix()
		second := createStream(t, b.js, jetstream.StreamConfig{Subjects: []string{rp + ".>"}})
		var seqs []int64
		require.NoError(t, b.db.Select(&seqs, `SELECT seq FROM events ORDER BY seq`))
		from, to := seqs[10], seqs[29]

		r := requireCLI(t, "replay", "--dry-run", "--from-seq", strconv.FormatInt(from, 10), "--to-seq", strconv.FormatInt(to, 10),
			"--database-url", b.db.DSN)
		require.Equal(t, "would replay 20 SUCCESS events\n", r.stdout)

		n, runID, _ := replay(t, b, "--from-seq", strconv.FormatInt(from, 10), "--to-seq", strconv.FormatInt(to, 10),
			"--subject-prefix", rp, "--batch", "7")
		require.Equal(t, 20, n)
		msgs := readStream(t, b.js, second)
		requireReplayed(t, msgs, b.eventIDs(t, `seq BETWEEN $1 AND $2`, from, to), runID)
		require.Len(t, readStream(t, b.js, b.stream), total, "the original stream gets nothing")
	})

	t.Run("time range dry run counts", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		published(t, b, entityNames("t", 2), 10)
		_, err := b.db.Exec(`UPDATE events SET created_at = now() - interval '3 hours'
			WHERE seq IN (SELECT seq FROM events ORDER BY seq LIMIT 4)`)
		require.NoError(t, err)
		for _, tc := range []struct {
			args []string
			want string
		}{
			{[]string{"--since", "1h"}, "would replay 6 SUCCESS events\n"},
			{[]string{"--until", "1h"}, "would replay 4 SUCCESS events\n"},
			{[]string{"--since", time.Now().Add(-4 * time.Hour).UTC().Format(time.RFC3339), "--until", "2h"}, "would replay 4 SUCCESS events\n"},
			{[]string{"--since", "1h", "--entity", "order/none"}, "would replay 0 SUCCESS events\n"},
		} {
			r := requireCLI(t, append([]string{"replay", "--dry-run", "--database-url", b.db.DSN}, tc.args...)...)
			require.Equal(t, tc.want, r.stdout, "replay --dry-run %v", tc.args)
		}
	})

	t.Run("a refusal stops with an error naming the event", func(t *testing.T) {
		t.Parallel()
		b := setup(t)
		published(t, b, entityNames("u", 2), 5)
		first := b.db.IDs(t, "")[0]
		r := cli(t, "replay", "--since", "1h", "--subject-prefix", "nostream"+testenv.Suffix(),
			"--database-url", b.db.DSN, "--nats-url", testenv.NATSURL())
		require.Equal(t, 1, r.code, "exit status; stderr:\n%s", r.stderr)
		require.Contains(t, r.stderr, "replay event "+first)
		require.Contains(t, r.stderr, "no JetStream stream covers subject")
		require.Contains(t, r.stderr, "0 of 5 events were replayed")
	})

	t.Run("usage errors exit 2", func(t *testing.T) {
		t.Parallel()
		for _, tc := range []struct {
			args   []string
			stderr string
		}{
			{[]string{"replay"}, "choose events with --entity, --from-seq/--to-seq or --since/--until"},
			{[]string{"replay", "--entity", "x"}, "use TYPE/ID"},
			{[]string{"replay", "--from-seq", "10", "--to-seq", "5"}, "--from-seq 10 --to-seq 5"},
			{[]string{"replay", "--since", "yesterday"}, `--since "yesterday"`},
			{[]string{"replay", "--since", "1h", "--subject-prefix", "a.*"}, "--subject-prefix"},
			{[]string{"replay", "--since", "1h", "--batch", "0"}, "--batch must be at least 1"},
		} {
			r := cli(t, append(tc.args, "--database-url", unreachableDSN)...)
			require.Equal(t, 2, r.code, "%v: exit status; stderr:\n%s", tc.args, r.stderr)
			require.Contains(t, r.stderr, tc.stderr, "%v", tc.args)
		}
	})
}
