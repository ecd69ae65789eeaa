package poller_test

import (
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// A big backlog held behind one FAILED event makes every claim slow: the
// claims must still end and publish the other entities, not be cut off by
// a statement_timeout and retried forever. About 3 s on a 2-core machine.
func TestBigBlockedBacklog(t *testing.T) {
	t.Parallel()
	b := setup(t)
	subject := b.prefix + ".order.changed"
	b.db.MustExec(`INSERT INTO events (event_id, event_target, event_type, entity_type, entity_id, event_data, event_status, attempts, last_error)
		VALUES (gen_random_uuid(), $1, 'Changed', 'order', 'stuck', '{}'::bytea, 'FAILED', 1, 'x')`, subject)
	b.db.MustExec(`INSERT INTO events (event_id, event_target, event_type, entity_type, entity_id, event_data)
		SELECT gen_random_uuid(), $1, 'Changed', 'order', 'stuck', '{}'::bytea FROM generate_series(1, 300000)`, subject)
	b.db.MustExec(`ANALYZE events`)
	var events []outbox.Event
	for i := range 200 {
		events = append(events, outbox.Event{EntityType: "order", EntityID: fmt.Sprint(i), Type: "Changed",
			Subject: subject, Data: json.RawMessage(`{}`)})
	}
	b.write(t, events...)
	cfg := fastConfig()
	cfg.AckTimeout = 500 * time.Millisecond // a claim statement_timeout of 2 × 500ms + 5s would cut every claim
	cfg.BatchSize = len(events)             // one claim publishes them all
	start := time.Now()
	b.start(t, cfg)
	testenv.Eventually(t, 5*time.Minute, func() bool { return b.db.Count(t, "SUCCESS") == len(events) }, "published")
	t.Logf("200 events behind 300000 blocked ones published in %s", time.Since(start))
}
