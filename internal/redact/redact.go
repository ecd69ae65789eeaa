// Package redact hides the secrets of connection strings (PostgreSQL DSNs
// and NATS URLs) in what the programs of this module print and log.
//
// DSN and NATS replace the secret parts of one connection string with
// Mask and keep the rest readable. They do not need the string to be
// valid: a password with an unescaped '#', '%', '@' or '/' makes a URL
// unparsable, yet such a string is still redacted, by over-covering when
// in doubt. A Scrubber is the safety net for text the program did not
// compose itself (a driver's error message quoting the DSN, a library's
// log line): it replaces every occurrence of the secrets it was given.
package redact

import (
	"cmp"
	"encoding/json"
	"io"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Mask is what stands in for a secret.
const Mask = "xxxxx"

// span is a byte range [from, to) of a string.
type span struct{ from, to int }

// urlScheme matches the start of a URL-shaped string, as lib/pq and
// nats.go recognise one: a scheme followed by "://".
var urlScheme = regexp.MustCompile(`^\s*[A-Za-z][A-Za-z0-9+.-]*://`)

// queryPassword matches a URL query parameter whose name ends in
// "password" (password, sslpassword), up to its value.
var queryPassword = regexp.MustCompile(`(?i)[?&][A-Za-z0-9_.-]*password=`)

// nextParam matches the start of the next query parameter.
var nextParam = regexp.MustCompile(`&[A-Za-z0-9_.-]+=`)

// DSN returns dsn, a PostgreSQL connection URL or key=value string, with
// every password replaced by Mask: the password of a URL's user info, and
// the value of any parameter whose name ends in "password" (a URL query
// parameter or a key=value pair, quoted or not). A key=value string that
// does not parse has each malformed word masked whole.
func DSN(dsn string) string { return mask(dsn, dsnSpans(dsn)) }

// NATS returns urls, one NATS server URL or several separated by commas,
// with the user info's password masked, or the whole user info when it is
// a token (nats://TOKEN@host): unlike a database URL's, a NATS URL's user
// part alone can be a secret.
func NATS(urls string) string { return mask(urls, natsSpans(urls)) }

// dsnSpans returns the secret spans of a PostgreSQL DSN.
func dsnSpans(s string) []span {
	loc := urlScheme.FindStringIndex(s)
	if loc == nil {
		return kvSpans(s)
	}
	start := loc[1]
	var spans []span
	// The user info ends at the last '@': a password may hold '@', '/',
	// '?' or '#' unescaped, and url.Parse would then split it elsewhere.
	// An '@' later in the query masks more than needed, never less.
	if at := strings.LastIndexByte(s, '@'); at > start {
		if colon := strings.IndexByte(s[start:at], ':'); colon >= 0 {
			spans = append(spans, span{start + colon + 1, at})
		}
	}
	for _, m := range queryPassword.FindAllStringIndex(s[start:], -1) {
		from := start + m[1]
		to := len(s)
		// The value ends where the next parameter starts; with no
		// next parameter, at the end of the string ('#' included).
		if n := nextParam.FindStringIndex(s[from:]); n != nil {
			to = from + n[0]
		}
		spans = append(spans, span{from, to})
	}
	return spans
}

// kvSpans returns the secret spans of a key=value DSN, tokenised as lib/pq
// does: keys, optional spaces, '=', optional spaces, then a value quoted
// with single quotes (backslash escapes any character) or unquoted up to
// the next space (backslash escapes there too).
func kvSpans(s string) []span {
	var spans []span
	isSpace := func(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v' }
	skip := func(i int) int {
		for i < len(s) && isSpace(s[i]) {
			i++
		}
		return i
	}
	i := skip(0)
	for i < len(s) {
		keyStart := i
		for i < len(s) && s[i] != '=' && !isSpace(s[i]) {
			i++
		}
		key := s[keyStart:i]
		j := skip(i)
		if j >= len(s) || s[j] != '=' {
			// Not key=value: lib/pq refuses the string and quotes it in
			// its error. Mask the word; it may be a mistyped URL.
			spans = append(spans, span{keyStart, i})
			i = skip(i)
			continue
		}
		i = skip(j + 1)
		valStart := i
		if i < len(s) && s[i] == '\'' {
			i++
			for i < len(s) && s[i] != '\'' {
				if s[i] == '\\' {
					i++
				}
				i++
			}
			i = min(i+1, len(s)) // past the closing quote, if any
			if strings.HasSuffix(strings.ToLower(key), "password") {
				// Quotes included: a password of quotes alone is masked.
				spans = append(spans, span{valStart, i})
			}
		} else {
			for i < len(s) && !isSpace(s[i]) {
				if s[i] == '\\' {
					i++
				}
				i++
			}
			i = min(i, len(s))
			if strings.HasSuffix(strings.ToLower(key), "password") {
				spans = append(spans, span{valStart, i})
			}
		}
		i = skip(i)
	}
	return spans
}

// natsServer matches the start of a server URL after the first in a
// comma-separated list: a comma, then a scheme.
var natsServer = regexp.MustCompile(`,\s*[A-Za-z][A-Za-z0-9+.-]*://`)

// natsSpans returns the secret spans of comma-separated NATS URLs. Servers
// are split only before a comma followed by a scheme, since a password may
// hold a comma; within each, the user info runs from the scheme's "://" to
// the last '@', since a password may hold an '@'. A password holding
// ",nats://" is split in two, both parts masked.
func natsSpans(s string) []span {
	var spans []span
	starts := []int{0}
	for _, m := range natsServer.FindAllStringIndex(s, -1) {
		starts = append(starts, m[0]+1)
	}
	for i, from := range starts {
		to := len(s)
		if i+1 < len(starts) {
			to = starts[i+1] - 1 // the comma
		}
		seg := s[from:to]
		at := strings.LastIndexByte(seg, '@')
		if at < 0 {
			continue
		}
		ui := 0
		if k := strings.Index(seg[:at], "://"); k >= 0 {
			ui = k + 3
		}
		if colon := strings.IndexByte(seg[ui:at], ':'); colon >= 0 {
			ui += colon + 1
		}
		spans = append(spans, span{from + ui, from + at})
	}
	return spans
}

// mask replaces the spans of s with Mask; overlapping or touching spans
// are merged into one.
func mask(s string, spans []span) string {
	if len(spans) == 0 {
		return s
	}
	slices.SortFunc(spans, func(a, b span) int { return cmp.Compare(a.from, b.from) })
	var b strings.Builder
	last := 0
	for i := 0; i < len(spans); {
		from, to := spans[i].from, spans[i].to
		for i++; i < len(spans) && spans[i].from <= to; i++ {
			to = max(to, spans[i].to)
		}
		b.WriteString(s[last:from])
		b.WriteString(Mask)
		last = to
	}
	b.WriteString(s[last:])
	return b.String()
}

// MinSecret is the shortest secret a Scrubber replaces wherever it
// appears: replacing every "t" or "pw" would garble the text beyond use
// (a password that short falls to guessing anyway). Shorter secrets are
// still hidden inside the DSNs and URLs the Scrubber was given.
const MinSecret = 4

// Scrubber replaces secrets in arbitrary text. The zero value replaces
// nothing. It is safe for concurrent use.
type Scrubber struct {
	r *strings.Replacer
}

// NewScrubber returns a Scrubber for the given PostgreSQL DSNs, NATS URLs
// and bare secrets (a password or token given on its own); empty strings
// are ignored. Each DSN or URL is replaced by its redacted form wherever
// it appears whole, and each secret found in it (as written, decoded from
// its percent or backslash escapes, and as Go and JSON quote it) of at
// least MinSecret bytes is replaced by Mask wherever it appears.
func NewScrubber(dsns, natsURLs, secrets []string) *Scrubber {
	type pair struct{ old, new string }
	var pairs []pair
	add := func(old, new string) {
		if old != "" && old != new {
			pairs = append(pairs, pair{old, new})
		}
	}
	addSecret := func(sec string) {
		for _, v := range variants(sec) {
			if len(v) >= MinSecret {
				add(v, Mask)
			}
		}
	}
	for _, d := range dsns {
		add(d, DSN(d))
		for _, sp := range dsnSpans(d) {
			addSecret(d[sp.from:sp.to])
		}
	}
	for _, u := range natsURLs {
		add(u, NATS(u))
		for _, sp := range natsSpans(u) {
			addSecret(u[sp.from:sp.to])
		}
	}
	for _, sec := range secrets {
		addSecret(sec)
	}
	if len(pairs) == 0 {
		return &Scrubber{}
	}
	// strings.Replacer tries the old strings in argument order at each
	// position: the longest first, so a whole DSN wins over its password.
	slices.SortStableFunc(pairs, func(a, b pair) int { return cmp.Compare(len(b.old), len(a.old)) })
	args := make([]string, 0, 2*len(pairs))
	for _, p := range pairs {
		args = append(args, p.old, p.new)
	}
	return &Scrubber{r: strings.NewReplacer(args...)}
}

// variants returns sec as written, unescaped the ways a DSN escapes it, cut
// where url.Parse cuts a URL, and each of those as strconv.Quote and JSON
// encode it (without the quotes), which is how text and JSON log handlers
// write a value.
func variants(sec string) []string {
	forms := []string{sec}
	if inner, ok := strings.CutPrefix(sec, "'"); ok {
		// A quoted key=value password: the quotes are not part of it.
		forms = append(forms, strings.TrimSuffix(inner, "'"))
		sec = forms[1]
	}
	if u, err := url.PathUnescape(sec); err == nil {
		forms = append(forms, u)
	}
	if u, err := url.QueryUnescape(sec); err == nil {
		forms = append(forms, u)
	}
	if strings.Contains(sec, `\`) {
		// Backslash escapes of a key=value DSN.
		var b strings.Builder
		for i := 0; i < len(sec); i++ {
			if sec[i] == '\\' && i+1 < len(sec) {
				i++
			}
			b.WriteByte(sec[i])
		}
		forms = append(forms, b.String())
	}
	// url.Parse cuts a URL at the first '#', '?' or '/', and its error
	// quotes what is left: a password holding one is seen cut there.
	if i := strings.IndexAny(sec, "#?/"); i > 0 {
		forms = append(forms, sec[:i])
	}
	var out []string
	for _, f := range forms {
		if f == "" {
			continue
		}
		q := strconv.Quote(f)
		j, _ := json.Marshal(f)
		out = append(out, f, q[1:len(q)-1], string(j[1:len(j)-1]))
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// String returns s with the secrets replaced.
func (s *Scrubber) String(text string) string {
	if s == nil || s.r == nil {
		return text
	}
	return s.r.Replace(text)
}

// Error returns err with its message scrubbed; errors.Is and errors.As see
// through it to err. A nil err stays nil.
func (s *Scrubber) Error(err error) error {
	if err == nil || s == nil || s.r == nil {
		return err
	}
	msg := err.Error()
	if clean := s.r.Replace(msg); clean != msg {
		return &scrubbedError{msg: clean, err: err}
	}
	return err
}

type scrubbedError struct {
	msg string
	err error
}

func (e *scrubbedError) Error() string { return e.msg }
func (e *scrubbedError) Unwrap() error { return e.err }

// Writer returns a writer that scrubs each Write before passing it to w.
// A secret split across two writes is not seen: use it under writers that
// write whole lines or records, as the log/slog handlers do.
func (s *Scrubber) Writer(w io.Writer) io.Writer {
	if s == nil || s.r == nil {
		return w
	}
	return scrubWriter{s: s, w: w}
}

type scrubWriter struct {
	s *Scrubber
	w io.Writer
}

// Unwrap returns the writer scrubbed output goes to, so that a caller can
// still ask whether it is a terminal.
func (sw scrubWriter) Unwrap() io.Writer { return sw.w }

func (sw scrubWriter) Write(p []byte) (int, error) {
	if _, err := io.WriteString(sw.w, sw.s.r.Replace(string(p))); err != nil {
		return 0, err
	}
	return len(p), nil
}
