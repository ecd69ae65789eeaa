package main

import (
	"bytes"
	"context"
	"errors"
	"net/url"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestUnescapedPasswordsAreRefusedUnseen: a password with URL delimiters
// that were not percent-encoded makes the URL unparsable, and the parser's
// message quotes the URL cut short; the command refuses it itself, saying
// how to write it, and shows no part of the password.
func TestUnescapedPasswordsAreRefusedUnseen(t *testing.T) {
	t.Parallel()
	const head = "Pw4head"
	for _, pw := range []string{head + "#tail", head + "%tail", head + "%zz", head + "@ta/il", head + "/tail", head + "?tail"} {
		for _, args := range [][]string{
			{"status", "--database-url", "postgres://postgres:" + pw + "@127.0.0.1:5432/test?sslmode=disable"},
			{"migrate", "--database-url", "postgresql://postgres:" + pw + "@127.0.0.1:5432/test"},
			{"run", "--database-url", "postgres://postgres@127.0.0.1:1/test", "--nats-url", "nats://user:" + pw + "@127.0.0.1:1"},
			{"run", "--database-url", "postgres://postgres@127.0.0.1:1/test", "--nats-url", "nats://127.0.0.1:1,nats://" + pw + "@127.0.0.1:1"},
		} {
			t.Run(args[0]+" "+url.PathEscape(args[len(args)-1]), func(t *testing.T) {
				t.Parallel()
				var stderr bytes.Buffer
				err := run(context.Background(), args, &stderr, &stderr)
				require.Error(t, err)
				require.True(t, errors.As(err, new(usageError)), "usage error (exit 2): %v", err)
				require.Contains(t, err.Error(), "percent-encode")
				out := err.Error() + stderr.String()
				require.NotContains(t, out, head, "no part of the password is shown")
				require.NotContains(t, out, "tail")
			})
		}
	}
}

func TestKeyValuePasswordIsNotShown(t *testing.T) {
	t.Parallel()
	const pw = `Pw4 se#cr%et'q`
	for _, dsn := range []string{
		`host=127.0.0.1 port=1 user=postgres password='Pw4 se#cr%et\'q' dbname=test sslmode=disable`,
		`host=127.0.0.1 port=1 user=postgres password=Pw4se#cr%et dbname=test sslmode=disable`,
		`postgres:/postgres:Pw4se#cr%et@127.0.0.1:1/test`, // a mistyped URL: not key=value either
	} {
		var stderr bytes.Buffer
		err := run(context.Background(), []string{"status", "--database-url", dsn}, &stderr, &stderr)
		require.Error(t, err)
		out := err.Error() + stderr.String()
		require.NotContains(t, out, "Pw4", "%s:\n%s", dsn, out)
		require.NotContains(t, out, "cr%et", "%s:\n%s", dsn, out)
	}
}

func TestFlagValues(t *testing.T) {
	t.Parallel()
	args := []string{"run", "--database-url", "a", "-database-url=b", "--database-url=c=d", "--nats-url", "n", "--database-url"}
	require.Equal(t, []string{"a", "b", "c=d"}, flagValues(args, "database-url"))
	require.Equal(t, []string{"n"}, flagValues(args, "nats-url"))
	require.Empty(t, flagValues(args, "nats-token"))
}

func TestSecretScrubberReadsFlagsAndEnvironment(t *testing.T) {
	// Not parallel: it sets the environment.
	t.Setenv("OUTBOX_NATS_TOKEN", "tok3n-from-env")
	t.Setenv("DATABASE_URL", "postgres://u:env-s3cret@db/x")
	s := secretScrubber([]string{"--nats-password", "flag-s3cret", "--nats-url=nats://u:url-s3cret@h"})
	got := s.String("tok3n-from-env env-s3cret flag-s3cret url-s3cret nats://u:url-s3cret@h postgres://u:env-s3cret@db/x")
	require.Equal(t, "xxxxx xxxxx xxxxx xxxxx nats://u:xxxxx@h postgres://u:xxxxx@db/x", got)
	require.False(t, strings.Contains(got, "s3cret"))

	// A flag overrides the environment: the variable's password is not
	// this run's secret, and is left alone.
	s = secretScrubber([]string{"--database-url", "postgres://u:flag-pw@db/x"})
	require.Equal(t, "xxxxx env-s3cret", s.String("flag-pw env-s3cret"))
}
