package poller

import (
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/stretchr/testify/require"
)

// subjectMatches agrees with the NATS server's own matching, on chosen
// cases and on random subjects and filters made of a few tokens.
func TestSubjectMatchesAgreesWithTheServer(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		subject, filter string
		want            bool
	}{
		{"orders.1.created", "orders.>", true},
		{"orders.1.created", "orders.*.created", true},
		{"orders.1.created", "orders.*", false},
		{"orders", "orders.>", false},
		{"orders", "orders", true},
		{"orders", ">", true},
		{"orders.1", "*", false},
		{"orders.1", "*.*", true},
		{"orders.1", "orders.1.>", false},
		{"orders.1.x.y", "*.1.>", true},
		{"ordersx.1", "orders.>", false},
	} {
		require.Equal(t, c.want, subjectMatches(c.subject, c.filter), "%q against %q", c.subject, c.filter)
		require.Equal(t, server.SubjectMatchesFilter(c.subject, c.filter), subjectMatches(c.subject, c.filter),
			"%q against %q: the server disagrees", c.subject, c.filter)
	}
	r := rand.New(rand.NewPCG(1, 2))
	tokens := func(alphabet []string) string {
		ts := make([]string, 1+r.IntN(4))
		for i := range ts {
			ts[i] = alphabet[r.IntN(len(alphabet))]
		}
		return strings.Join(ts, ".")
	}
	for range 20000 {
		subject := tokens([]string{"a", "b", "ab"})
		filter := tokens([]string{"a", "b", "*", "ab"})
		if r.IntN(3) == 0 {
			filter += ".>"
		}
		require.Equal(t, server.SubjectMatchesFilter(subject, filter), subjectMatches(subject, filter),
			"%q against %q", subject, filter)
	}
}
