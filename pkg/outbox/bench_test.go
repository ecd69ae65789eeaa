package outbox_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
	"github.com/pgnats/outbox/pkg/outbox"
)

// benchEvent has a 256-byte JSON payload and one header.
func benchEvent() outbox.Event {
	return outbox.Event{
		EntityType: "order",
		EntityID:   "o-1",
		Type:       "OrderCreated",
		Data:       json.RawMessage(`{"note":"` + strings.Repeat("x", 256-len(`{"note":""}`)) + `"}`),
		Headers:    map[string]string{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
	}
}

func BenchmarkValidateSubject(b *testing.B) {
	for b.Loop() {
		if err := outbox.ValidateSubject("shop.orders.eu-west.OrderCreated"); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkPrepare measures validation and encoding of one event with a
// 256-byte payload: the CPU cost Write adds before its round trip.
func BenchmarkPrepare(b *testing.B) {
	w, err := outbox.NewWriter(outbox.Config{})
	require.NoError(b, err)
	ev := benchEvent()
	b.ReportAllocs()
	for b.Loop() {
		if _, _, _, err := w.Prepare(0, ev); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkWrite measures one committed transaction writing n events
// (256-byte payloads) into the real PostgreSQL: mode=batch with one Write
// call (one multi-row INSERT), mode=row with one Write call per event, the
// baseline a row-at-a-time outbox pays. Compare them with
// benchstat -col /mode.
func BenchmarkWrite(b *testing.B) {
	ctx := context.Background()
	for _, n := range []int{1, 10, 100} {
		for _, mode := range []string{"batch", "row"} {
			b.Run(fmt.Sprintf("events=%d/mode=%s", n, mode), func(b *testing.B) {
				db := testenv.NewDB(b)
				w, err := outbox.NewWriter(outbox.Config{})
				require.NoError(b, err)
				events := make([]outbox.Event, n)
				for i := range events {
					events[i] = benchEvent()
				}
				b.ReportAllocs()
				loops := 0
				for b.Loop() {
					tx, err := db.BeginTx(ctx, nil)
					if err != nil {
						b.Fatal(err)
					}
					if mode == "batch" {
						_, err = w.Write(ctx, tx, events...)
					} else {
						for i := 0; i < n && err == nil; i++ {
							_, err = w.Write(ctx, tx, events[i])
						}
					}
					if err != nil {
						b.Fatal(err)
					}
					if err := tx.Commit(); err != nil {
						b.Fatal(err)
					}
					loops++
				}
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(loops*n), "ns/event")
			})
		}
	}
}
