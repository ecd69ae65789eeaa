package outbox

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// ErrInvalidEvent is matched (errors.Is) by every validation error: the
// event was rejected before any SQL ran and the caller's transaction is
// still usable.
var ErrInvalidEvent = errors.New("invalid event")

// ValidationError says which event of a Write call was rejected, which field
// of it, and why.
type ValidationError struct {
	Index  int    // position of the event in the Write call
	Field  string // Event field name: "EntityType", "Subject", "Data", ...
	Reason string
}

func (e *ValidationError) Error() string {
	return fmt.Sprintf("invalid event %d: %s: %s", e.Index, e.Field, e.Reason)
}

// Is reports whether target is ErrInvalidEvent.
func (e *ValidationError) Is(target error) bool { return target == ErrInvalidEvent }

// ValidateSubject reports why s cannot be a subject the outbox publishes to,
// or nil: tokens are separated by dots, none may be empty, and none may hold
// whitespace, control characters or the wildcards '*' and '>'.
func ValidateSubject(s string) error {
	if s == "" {
		return errors.New("must not be empty")
	}
	if !utf8.ValidString(s) {
		return errors.New("must be valid UTF-8")
	}
	for i, tok := range strings.Split(s, ".") {
		if tok == "" {
			return fmt.Errorf("token %d is empty (leading, trailing or double dot)", i+1)
		}
		if tok == "*" || tok == ">" || strings.ContainsAny(tok, "*>") {
			return fmt.Errorf("token %q holds a wildcard ('*' or '>')", tok)
		}
		if strings.IndexFunc(tok, func(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) }) >= 0 {
			return fmt.Errorf("token %q holds whitespace or a control character", tok)
		}
	}
	return nil
}

// validHeaderValue reports whether v can travel as a NATS header value.
func validHeaderValue(v string) bool {
	return utf8.ValidString(v) && !strings.ContainsAny(v, "\r\n\x00")
}

// validHeaderKey reports whether k can be a NATS header name.
func validHeaderKey(k string) bool {
	if k == "" {
		return false
	}
	for _, r := range k {
		if r <= ' ' || r >= 0x7f || r == ':' {
			return false
		}
	}
	return true
}

// prepared is an event that passed validation, ready for the INSERT.
type prepared struct {
	subject string
	data    []byte
	headers []byte
}

// prepare validates ev and encodes its payload and headers.
func (w *Writer) prepare(i int, ev Event) (prepared, error) {
	bad := func(field, reason string, args ...any) (prepared, error) {
		return prepared{}, &ValidationError{Index: i, Field: field, Reason: fmt.Sprintf(reason, args...)}
	}
	for _, f := range []struct{ name, value string }{
		{"EntityType", ev.EntityType},
		{"EntityID", ev.EntityID},
		{"Type", ev.Type},
	} {
		if f.value == "" {
			return bad(f.name, "required")
		}
		if !validHeaderValue(f.value) {
			return bad(f.name, "must be valid UTF-8 without CR, LF or NUL")
		}
	}
	subject := ev.Subject
	if subject == "" {
		subject = ev.EntityType + "." + ev.Type
	}
	if err := ValidateSubject(subject); err != nil {
		field := "Subject"
		if ev.Subject == "" {
			field = "Subject (from EntityType.Type)"
		}
		return bad(field, "%q: %v", subject, err)
	}
	size := len(subject)
	for k, v := range ev.Headers {
		if !validHeaderKey(k) {
			return bad("Headers", "key %q: must be printable ASCII without spaces or ':'", k)
		}
		if !validHeaderValue(v) {
			return bad("Headers", "value of %q: must be valid UTF-8 without CR, LF or NUL", k)
		}
		if isReservedHeader(k) {
			return bad("Headers", "key %q is set by the publisher", k)
		}
		size += len(k) + len(v)
	}
	data, err := encodeData(ev.Data)
	if err != nil {
		return bad("Data", "%v", err)
	}
	size += len(data)
	if size > w.maxBytes {
		return bad("Data", "event is %d bytes with subject and headers, over the maximum of %d", size, w.maxBytes)
	}
	headers, err := json.Marshal(ev.Headers)
	if err != nil {
		return bad("Headers", "%v", err)
	}
	if ev.Headers == nil {
		headers = []byte("{}")
	}
	return prepared{subject: subject, data: data, headers: headers}, nil
}

// encodeData turns an event payload into JSON text: []byte and
// json.RawMessage must already be valid JSON; anything else is marshalled.
func encodeData(v any) ([]byte, error) {
	var raw []byte
	switch d := v.(type) {
	case nil:
		return nil, errors.New("required (use json.RawMessage(\"null\") for an empty payload)")
	case json.RawMessage:
		raw = d
	case []byte:
		raw = d
	default:
		b, err := json.Marshal(v)
		if err != nil {
			return nil, fmt.Errorf("marshal to JSON: %w", err)
		}
		raw = b
	}
	if !json.Valid(raw) {
		return nil, errors.New("not valid JSON")
	}
	// encoding/json accepts these; PostgreSQL's jsonb would refuse them in
	// the INSERT, aborting the caller's transaction.
	if !utf8.Valid(raw) {
		return nil, errors.New("not valid UTF-8")
	}
	if err := checkEscapes(raw); err != nil {
		return nil, err
	}
	if err := checkNumbers(raw); err != nil {
		return nil, err
	}
	return raw, nil
}

// isReservedHeader reports whether k is a name the publisher or NATS owns:
// Event.Headers documents "Nats-" and "Outbox-" names as reserved.
func isReservedHeader(k string) bool {
	k = strings.ToLower(k)
	return strings.HasPrefix(k, "nats-") || strings.HasPrefix(k, "outbox-")
}

// checkEscapes reports a \u escape that PostgreSQL's jsonb cannot store:
// \u0000, or a UTF-16 surrogate that is not part of a high-low pair. raw
// must be valid JSON, so every backslash starts an escape inside a string.
func checkEscapes(raw []byte) error {
	for i := 0; i < len(raw); i++ {
		if raw[i] != '\\' {
			continue
		}
		i++ // the escaped character; valid JSON has one
		if raw[i] != 'u' {
			continue
		}
		r := hex4(raw[i+1:])
		i += 4
		switch {
		case r == 0:
			return errors.New(`holds \u0000, which PostgreSQL's jsonb cannot store`)
		case r >= 0xd800 && r <= 0xdbff:
			if i+2 < len(raw) && raw[i+1] == '\\' && raw[i+2] == 'u' {
				if lo := hex4(raw[i+3:]); lo >= 0xdc00 && lo <= 0xdfff {
					i += 6
					continue
				}
			}
			return fmt.Errorf(`holds \u%04x, a high surrogate without a low one after it, which PostgreSQL's jsonb refuses`, r)
		case r >= 0xdc00 && r <= 0xdfff:
			return fmt.Errorf(`holds \u%04x, a low surrogate without a high one before it, which PostgreSQL's jsonb refuses`, r)
		}
	}
	return nil
}

// hex4 decodes the four hex digits of a \u escape (valid JSON has them).
func hex4(b []byte) rune {
	v, _ := strconv.ParseUint(string(b[:4]), 16, 16)
	return rune(v)
}

// PostgreSQL's numeric, which jsonb stores numbers in, holds at most
// 131072 digits before the decimal point and 16383 after it, and reads
// exponents up to PG_INT32_MAX/2.
const (
	pgNumericIntDigits = 131072
	pgNumericScale     = 16383
	pgNumericExponent  = 1<<30 - 1
)

// checkNumbers reports a JSON number that PostgreSQL's jsonb cannot store
// ("value overflows numeric format"), such as 1e1000000: encoding/json
// accepts any exponent. raw must be valid JSON.
func checkNumbers(raw []byte) error {
	for i := 0; i < len(raw); i++ {
		switch c := raw[i]; {
		case c == '"':
			for i++; raw[i] != '"'; i++ {
				if raw[i] == '\\' {
					i++
				}
			}
		case c == '-' || '0' <= c && c <= '9':
			j := i
			for j < len(raw) && strings.IndexByte("+-0123456789.eE", raw[j]) >= 0 {
				j++
			}
			if !pgNumeric(string(raw[i:j])) {
				num := string(raw[i:j])
				if len(num) > 24 {
					num = num[:21] + "..."
				}
				return fmt.Errorf("holds the number %s, outside the range of PostgreSQL's numeric (%d digits before the point, %d after), which jsonb refuses",
					num, pgNumericIntDigits, pgNumericScale)
			}
			i = j - 1
		}
	}
	return nil
}

// pgNumeric reports whether the JSON number num fits PostgreSQL's numeric.
func pgNumeric(num string) bool {
	mant, exp := strings.TrimPrefix(num, "-"), int64(0)
	if e := strings.IndexAny(mant, "eE"); e >= 0 {
		var err error
		if exp, err = strconv.ParseInt(mant[e+1:], 10, 64); err != nil || exp > pgNumericExponent || exp < -pgNumericExponent {
			return false
		}
		mant = mant[:e]
	}
	intPart, frac, _ := strings.Cut(mant, ".")
	if int64(len(frac))-exp > pgNumericScale {
		return false // the scale counts trailing zeros, even of 0
	}
	first := strings.IndexFunc(intPart+frac, func(r rune) bool { return r != '0' })
	return first < 0 || int64(len(intPart)-first)+exp <= pgNumericIntDigits
}
