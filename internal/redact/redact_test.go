package redact_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/redact"
)

func TestDSN(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, in, want string }{
		{"url without password", "postgres://postgres@127.0.0.1:5432/test?sslmode=disable", "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"},
		{"url", "postgres://u:s3cret@db:5432/x?sslmode=disable", "postgres://u:xxxxx@db:5432/x?sslmode=disable"},
		{"url, escaped password", "postgresql://u:p%23w%25d@db/x", "postgresql://u:xxxxx@db/x"},
		{"url, unescaped # and %", "postgres://u:se#cr%et@db:5432/x", "postgres://u:xxxxx@db:5432/x"},
		{"url, # that parses as a port and fragment", "postgres://u:12#34@db:5432/x", "postgres://u:xxxxx@db:5432/x"},
		{"url, unescaped @ and /", "postgres://u:p@s/s@db/x", "postgres://u:xxxxx@db/x"},
		{"url, password parameter", "postgres://u@db/x?sslmode=disable&password=s3cret&application_name=a", "postgres://u@db/x?sslmode=disable&password=xxxxx&application_name=a"},
		{"url, sslpassword parameter first", "postgres://db/x?sslpassword=s3#cret", "postgres://db/x?sslpassword=xxxxx"},
		{"url without user info", "postgres://db:5432/x", "postgres://db:5432/x"},
		{"key=value", "host=db user=u password=s3cret dbname=x", "host=db user=u password=xxxxx dbname=x"},
		{"key=value, spaces around =", "host=db password = s3cret dbname=x", "host=db password = xxxxx dbname=x"},
		{"key=value, quoted", `host=db password='s3 cr\'et' dbname=x`, `host=db password=xxxxx dbname=x`},
		{"key=value, unterminated quote", `host=db password='s3 cret dbname=x`, `host=db password=xxxxx`},
		{"key=value, upper case key", "host=db PASSWORD=s3cret", "host=db PASSWORD=xxxxx"},
		{"key=value, sslpassword", "sslpassword=s3cret host=db", "sslpassword=xxxxx host=db"},
		{"key=value, malformed word masked", "postgres:/u:s3cret@db", "xxxxx"},
		{"key=value, unquoted password with a space", "password=s3 cret host=db", "password=xxxxx xxxxx host=db"},
		{"empty", "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			require.Equal(t, tc.want, redact.DSN(tc.in))
		})
	}
}

func TestNATS(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, in, want string }{
		{"no credentials", "nats://127.0.0.1:4222", "nats://127.0.0.1:4222"},
		{"token", "nats://s3cret-token@127.0.0.1:4222", "nats://xxxxx@127.0.0.1:4222"},
		{"user and password", "nats://user:s3cret@127.0.0.1:4222", "nats://user:xxxxx@127.0.0.1:4222"},
		{"several servers", "tls://a:s3cret@h1:4222,tls://s3cret@h2:4222", "tls://a:xxxxx@h1:4222,tls://xxxxx@h2:4222"},
		{"spaces after commas", "nats://s3cret@h1:4222, nats://h2:4222", "nats://xxxxx@h1:4222, nats://h2:4222"},
		{"unparsable scheme", "%zz://s3cret@host", "%zz://xxxxx@host"},
		{"password with # , and @", "nats://user:s3#c,r@t@h1:4222", "nats://user:xxxxx@h1:4222"},
		{"no scheme", "user:s3cret@h1:4222", "user:xxxxx@h1:4222"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			require.Equal(t, tc.want, redact.NATS(tc.in))
		})
	}
}

func TestScrubber(t *testing.T) {
	t.Parallel()
	dsn := "postgres://u:se#cr%et@db:5432/x"
	s := redact.NewScrubber([]string{dsn}, []string{"nats://tok3n@h:4222"}, []string{"bare-s3cret"})

	t.Run("whole DSN is shown redacted", func(t *testing.T) {
		t.Parallel()
		require.Equal(t, "connect postgres://u:xxxxx@db:5432/x: refused", s.String("connect "+dsn+": refused"))
	})
	t.Run("the part of a password url.Parse quotes is scrubbed", func(t *testing.T) {
		t.Parallel()
		dsn := "postgres://u:s3cr3t#more@db:5432/x"
		_, err := url.Parse(dsn)
		require.Error(t, err)
		// url.Parse quotes the URL cut at the '#'.
		require.Contains(t, err.Error(), "s3cr3t")
		got := redact.NewScrubber([]string{dsn}, nil, nil).Error(err).Error()
		require.NotContains(t, got, "s3cr3t")
		require.NotContains(t, got, "more")
	})
	t.Run("error keeps its chain", func(t *testing.T) {
		t.Parallel()
		base := errors.New("refused")
		err := s.Error(fmt.Errorf("token %s, password %q: %w", "tok3n", "se#cr%et", base))
		require.Equal(t, `token xxxxx, password "xxxxx": refused`, err.Error())
		require.ErrorIs(t, err, base)
	})
	t.Run("writer", func(t *testing.T) {
		t.Parallel()
		var b strings.Builder
		_, err := fmt.Fprintf(s.Writer(&b), `{"msg":"login","pw":"bare-s3cret"}`)
		require.NoError(t, err)
		require.Equal(t, `{"msg":"login","pw":"xxxxx"}`, b.String())
	})
	t.Run("zero scrubber changes nothing", func(t *testing.T) {
		t.Parallel()
		require.Equal(t, "se#cr%et", redact.NewScrubber(nil, nil, []string{""}).String("se#cr%et"))
	})
}

// form is a connection string holding a password.
type form struct {
	s    string
	nats bool // a NATS URL list, not a DSN
	// token says the password stands alone as a NATS URL's user info:
	// with a ':' in it, it reads as user:password and the user is shown.
	token bool
	// split says the client would not read the password as one value (an
	// unquoted key=value password with white space, a query parameter
	// holding "&key="): what is left of it is structure, nothing to check.
	split bool
	// holds says that the string's password, as its client reads it, is
	// the whole password: some forms cut an unescaped password short
	// (at a space, at "&key="), and then only the part read is a secret
	// a Scrubber can know of.
	holds bool
}

var (
	spaceOrQuote = regexp.MustCompile(`[\s'\\]`)
	queryParam   = regexp.MustCompile(`&[A-Za-z0-9_.-]+=`)
	natsList     = regexp.MustCompile(`,\s*[A-Za-z][A-Za-z0-9+.-]*://`)
)

// forms embeds a password, as written by someone who did not escape it
// and as escaped, in every form of connection string.
func forms(pw string) []form {
	quoted := strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(pw)
	return []form{
		{s: "postgres://user:" + pw + "@127.0.0.1:5432/test?sslmode=disable", holds: true},
		{s: "postgresql://user:" + url.PathEscape(pw) + "@127.0.0.1:5432/test", holds: true},
		{s: "postgres://user@127.0.0.1/test?sslmode=disable&password=" + pw + "&application_name=a", holds: true,
			split: queryParam.MatchString(pw)},
		{s: "postgres://127.0.0.1/test?password=" + url.QueryEscape(pw), holds: true},
		{s: "host=127.0.0.1 user=u password=" + pw + " dbname=test", holds: !spaceOrQuote.MatchString(pw),
			split: strings.ContainsAny(pw, " \t\n\r\f\v")},
		{s: "host=127.0.0.1 user=u password='" + quoted + "' dbname=test", holds: true},
		{s: "nats://user:" + pw + "@127.0.0.1:4222,nats://user:" + pw + "@127.0.0.2:4222", nats: true, holds: !natsList.MatchString(pw)},
		{s: "nats://" + pw + "@127.0.0.1:4222", nats: true, token: true, holds: !natsList.MatchString(pw)},
	}
}

// checkNoPassword fails when pw survives redaction of any form, or
// scrubbing of a message quoting the form and the password in the ways
// loggers and errors do. The mask in the output is read as one character
// that pw does not hold, so that a password spelled partly by the mask
// ("x", " x") is not taken for a leak; a password that the form shows
// anyway with that character as its password (it spells part of the host)
// proves nothing and is skipped.
func checkNoPassword(t *testing.T, pw string) {
	if pw == "" {
		return
	}
	var sentinel string
	for c := byte(0); c < 0x80; c++ {
		if strings.IndexByte(pw, c) < 0 {
			sentinel = string(c)
			break
		}
	}
	if sentinel == "" {
		return // pw holds every ASCII character
	}
	quoted := strconv.Quote(pw)
	jsoned, _ := json.Marshal(pw)
	neutral := forms(sentinel)
	for i, f := range forms(pw) {
		if strings.Contains(neutral[i].s, pw) || f.token && strings.Contains(pw, ":") || f.split {
			continue
		}
		var out string
		if f.nats {
			out = redact.NATS(f.s)
		} else {
			out = redact.DSN(f.s)
		}
		require.NotContains(t, strings.ReplaceAll(out, redact.Mask, sentinel), pw, "redacting %q: %q", f.s, out)

		message := func(dsn, pw string) string {
			m := "connect " + dsn
			if f.holds {
				j, _ := json.Marshal(pw)
				m += fmt.Sprintf(": %s %q %s", pw, pw, j)
			}
			return m
		}
		if strings.Contains(message(neutral[i].s, sentinel), pw) || len(pw) < redact.MinSecret {
			continue
		}
		var s *redact.Scrubber
		if f.nats {
			s = redact.NewScrubber(nil, []string{f.s}, nil)
		} else {
			s = redact.NewScrubber([]string{f.s}, nil, nil)
		}
		msg := strings.ReplaceAll(s.String(message(f.s, pw)), redact.Mask, sentinel)
		require.NotContains(t, msg, pw, "scrubbing a message about %q", f.s)
		if f.holds {
			require.NotContains(t, msg, quoted[1:len(quoted)-1], "scrubbing a message about %q", f.s)
			require.NotContains(t, msg, string(jsoned[1:len(jsoned)-1]), "scrubbing a message about %q", f.s)
		}
	}
}

// seeds are passwords of the kinds that have broken redactors: URL
// delimiters unescaped, quotes, escapes, spaces, separators of lists.
var seeds = []string{
	"se#cr%et", "12#34", "p@ss/w?rd", "pa ss word", "it's", `back\slash`, "x://y@z", "ünï©ødé",
	"tab\there", ",comma,", "&password=", "'", "%zz%", "a=b c=d", "@@@@", "::::", "pw&sslmode=x", "#",
}

func TestPasswordNeverSurvives(t *testing.T) {
	t.Parallel()
	for _, pw := range seeds {
		t.Run(pw, func(t *testing.T) {
			t.Parallel()
			checkNoPassword(t, pw)
		})
	}
}

// FuzzRedact searches for a password that survives redaction of one of
// the connection string forms: go test -fuzz FuzzRedact ./internal/redact.
func FuzzRedact(f *testing.F) {
	for _, pw := range seeds {
		f.Add(pw)
	}
	f.Fuzz(checkNoPassword)
}
