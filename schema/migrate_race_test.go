package schema_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/schema"
)

// Two migrations of one table at once, while writers of the jsonb release
// keep inserting: one applies 0003, the other finds nothing to do, and every
// row a writer committed has its payload, as written, in the bytea column.
func TestMigrateConcurrentlyWithJSONBWriters(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db, _, _ := newSchema(t)
	db.SetMaxOpenConns(8)
	_, err := schema.MigrateTo(ctx, db, schema.Tables{}, 2)
	require.NoError(t, err)
	_, err = db.Exec(`INSERT INTO events (event_id, event_target, event_type, entity_type, entity_id, event_data)
		SELECT gen_random_uuid(), 'order.Changed', 'Changed', 'order', 'o', jsonb_build_object('i', i)
		FROM generate_series(1, $1) i`, 3*schema.BatchRows)
	require.NoError(t, err)

	stop := make(chan struct{})
	var (
		wg        sync.WaitGroup
		committed atomic.Int64
	)
	for w := range 2 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				_, err := db.Exec(`INSERT INTO events (event_id, event_target, event_type, entity_type, entity_id, event_data)
					VALUES (gen_random_uuid(), 'order.Changed', 'Changed', 'order', $1, jsonb_build_object('w', $2::int, 'i', $3::int))`,
					fmt.Sprint("w", w), w, i)
				if err == nil {
					committed.Add(1)
				}
			}
		})
	}
	var mig sync.WaitGroup
	results := make([][]int, 2)
	errs := make([]error, 2)
	for i := range 2 {
		mig.Go(func() { results[i], errs[i] = schema.Migrate(ctx, db, schema.Tables{}) })
	}
	mig.Wait()
	close(stop)
	wg.Wait()
	require.NoError(t, errs[0])
	require.NoError(t, errs[1])
	require.ElementsMatch(t, [][]int{{3, 4}, nil}, results)
	require.Positive(t, committed.Load())

	var total, bad int
	require.NoError(t, db.QueryRow(`SELECT count(*),
		count(*) FILTER (WHERE event_data IS NULL OR convert_from(event_data, 'UTF8')::jsonb IS NULL)
		FROM events`).Scan(&total, &bad))
	require.Equal(t, int(committed.Load())+3*schema.BatchRows, total)
	require.Zero(t, bad)
}
