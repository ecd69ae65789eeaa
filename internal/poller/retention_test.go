package poller_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/poller"
)

func TestCheckProcessedRetention(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name      string
		retention time.Duration
		maxAge    time.Duration
		refused   string // part of the error; empty: accepted
	}{
		{"longer than max_age", 72 * time.Hour, 48 * time.Hour, ""},
		{"equal to max_age", 48 * time.Hour, 48 * time.Hour, ""},
		{"shorter than max_age", 24 * time.Hour, 48 * time.Hour, "keeps messages for 48h0m0s (max_age), longer than the retention 24h0m0s"},
		{"unlimited max_age refuses any retention", 10000 * time.Hour, 0, "max_age 0 (unlimited)"},
		{"retention off is always accepted", 0, 0, ""},
		{"retention off with a max_age", 0, time.Hour, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			err := poller.CheckProcessedRetention(tc.retention, poller.StreamAge{Name: "ORDERS", Subject: "orders.created", MaxAge: tc.maxAge})
			if tc.refused == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, poller.ErrProcessedRetentionTooShort)
			require.ErrorContains(t, err, tc.refused)
			require.ErrorContains(t, err, `stream ORDERS (covering "orders.created")`)
		})
	}
}
