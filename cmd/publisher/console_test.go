package main

import (
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/testenv"
)

func TestConsoleFlagsChecked(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		o    consoleOptions
		addr string
		want string // "" for no error
	}{
		{"off", consoleOptions{}, "", ""},
		{"flags without --console", consoleOptions{actions: true}, ":9090", "need --console"},
		{"no http addr", consoleOptions{enabled: true, token: "t"}, "", "needs --http-addr"},
		{"no authentication", consoleOptions{enabled: true}, ":9090", "needs authentication"},
		{"user without password", consoleOptions{enabled: true, user: "u"}, ":9090", "together"},
		{"insecure on every interface", consoleOptions{enabled: true, insecure: true}, ":9090", "only on a loopback"},
		{"insecure on a public address", consoleOptions{enabled: true, insecure: true}, "10.1.2.3:9090", "only on a loopback"},
		{"insecure with credentials", consoleOptions{enabled: true, insecure: true, token: "t"}, "127.0.0.1:9090", "turns authentication off"},
		{"insecure on loopback", consoleOptions{enabled: true, insecure: true}, "127.0.0.1:9090", ""},
		{"insecure on localhost", consoleOptions{enabled: true, insecure: true}, "localhost:9090", ""},
		{"insecure on ::1", consoleOptions{enabled: true, insecure: true}, "[::1]:9090", ""},
		{"basic", consoleOptions{enabled: true, user: "u", password: "p"}, ":9090", ""},
		{"token", consoleOptions{enabled: true, token: "t"}, ":9090", ""},
	} {
		err := tc.o.check(tc.addr)
		if tc.want == "" {
			require.NoError(t, err, tc.name)
			continue
		}
		require.ErrorContains(t, err, tc.want, tc.name)
		require.ErrorAs(t, err, new(usageError), tc.name)
	}
}

func TestConsoleAuthentication(t *testing.T) {
	t.Parallel()
	db := testenv.NewDB(t)
	s := &consoleServer{o: consoleOptions{enabled: true, user: "ops", password: "s3cret", token: "tok"}, log: slog.New(slog.DiscardHandler)}
	get := func(set func(*http.Request)) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		req := httptest.NewRequestWithContext(t.Context(), http.MethodGet, pathConsole, nil)
		if set != nil {
			set(req)
		}
		s.ServeHTTP(rec, req)
		return rec
	}
	rec := get(nil)
	require.Equal(t, http.StatusUnauthorized, rec.Code)
	require.Contains(t, rec.Header().Get("WWW-Authenticate"), "Basic")
	require.Equal(t, http.StatusServiceUnavailable, get(func(r *http.Request) { r.SetBasicAuth("ops", "s3cret") }).Code,
		"before the database answers")

	require.NoError(t, s.start(db.DB.DB, "events", "processed_message", nil))
	for name, set := range map[string]func(*http.Request){
		"wrong password": func(r *http.Request) { r.SetBasicAuth("ops", "nope") },
		"wrong user":     func(r *http.Request) { r.SetBasicAuth("root", "s3cret") },
		"wrong token":    func(r *http.Request) { r.Header.Set("Authorization", "Bearer nope") },
		"none":           nil,
	} {
		require.Equal(t, http.StatusUnauthorized, get(set).Code, name)
	}
	rec = get(func(r *http.Request) { r.SetBasicAuth("ops", "s3cret") })
	require.Equal(t, http.StatusOK, rec.Code)
	require.Contains(t, rec.Body.String(), "read-only")
	require.NotContains(t, rec.Body.String(), "actions enabled")
	require.Equal(t, http.StatusOK, get(func(r *http.Request) { r.Header.Set("Authorization", "Bearer tok") }).Code)

	open := &consoleServer{o: consoleOptions{enabled: true, insecure: true, actions: true}, log: slog.New(slog.DiscardHandler)}
	require.NoError(t, open.start(db.DB.DB, "events", "processed_message", nil))
	rec = httptest.NewRecorder()
	open.ServeHTTP(rec, httptest.NewRequestWithContext(t.Context(), http.MethodGet, pathConsole, nil))
	require.Equal(t, http.StatusOK, rec.Code)
	require.Contains(t, rec.Body.String(), "actions enabled")
}
