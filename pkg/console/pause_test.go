package console_test

import (
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/pkg/console"
)

func TestPauseAction(t *testing.T) {
	t.Parallel()
	ro := newFixture(t, console.Config{})
	_, body := ro.get(t, "")
	require.Contains(t, body, "Active: publishers claim")
	require.NotContains(t, body, "Pause publishing", "a read-only console offers no pause")
	resp, body := ro.post(t, "pause", nil)
	require.Equal(t, http.StatusForbidden, resp.StatusCode, body)
	st, err := poller.ReadPause(t.Context(), ro.db.DB.DB, "")
	require.NoError(t, err)
	require.False(t, st.Paused, "a refused pause paused")

	f := newFixture(t, console.Config{Authorize: allowAll})
	_, body = f.get(t, "failed")
	require.Contains(t, body, `action="/ops/outbox/pause"`)
	resp, _ = f.post(t, "pause", url.Values{"back": {"failed"}})
	require.Equal(t, http.StatusSeeOther, resp.StatusCode)
	require.True(t, strings.HasPrefix(resp.Header.Get("Location"), base+"failed?msg="), resp.Header.Get("Location"))
	st, err = poller.ReadPause(t.Context(), f.db.DB.DB, "")
	require.NoError(t, err)
	require.True(t, st.Paused)
	require.Equal(t, "alice", st.By)
	require.Contains(t, f.logs.String(), `msg="console action" action=pause who=alice`)
	_, body = f.get(t, "")
	require.Contains(t, body, "Paused by <code>alice</code>")
	require.Contains(t, body, `action="/ops/outbox/resume"`)

	resp, _ = f.post(t, "resume", nil)
	require.Equal(t, http.StatusSeeOther, resp.StatusCode)
	require.True(t, strings.HasPrefix(resp.Header.Get("Location"), base+"?msg="), resp.Header.Get("Location"))
	st, err = poller.ReadPause(t.Context(), f.db.DB.DB, "")
	require.NoError(t, err)
	require.False(t, st.Paused)
}
