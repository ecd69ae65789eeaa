package poller

import (
	"strings"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
)

// What the NATS client refuses for one message is that message's refusal;
// what it refuses for every message is an outage. The errors come from a
// real client and server.
func TestRefusedByClient(t *testing.T) {
	t.Parallel()
	nc, js := testenv.NATS(t)
	publish := func(m *nats.Msg) error {
		_, err := js.PublishMsgAsync(m)
		return err
	}
	for _, tt := range []struct {
		name    string
		msg     func() *nats.Msg
		refused bool
	}{
		{"bad header name", func() *nats.Msg {
			m := nats.NewMsg("a.b")
			m.Header.Set("x-tenant/id", "1")
			return m
		}, true},
		{"subject with a space", func() *nats.Msg { return nats.NewMsg("a b") }, true},
		{"over max_payload", func() *nats.Msg {
			m := nats.NewMsg("a.b")
			m.Data = []byte(strings.Repeat("x", int(nc.MaxPayload())+1))
			return m
		}, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			err := publish(tt.msg())
			require.Error(t, err)
			reason, refused := refusedByClient(err)
			require.Equal(t, tt.refused, refused, "%v", err)
			require.Contains(t, reason, err.Error())
		})
	}
	t.Run("closed connection", func(t *testing.T) {
		nc2, _ := testenv.NATS(t)
		js2, err := jetstream.New(nc2)
		require.NoError(t, err)
		nc2.Close()
		_, err = js2.PublishMsgAsync(nats.NewMsg("a.b"))
		require.Error(t, err)
		_, refused := refusedByClient(err)
		require.False(t, refused, "%v", err)
	})
}
