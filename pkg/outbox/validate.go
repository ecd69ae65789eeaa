package outbox

import (
	"encoding/json"
	"errors"
	"fmt"
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
	data, err := encodeData(ev.Data, ev.ContentType)
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

// isReservedHeader reports whether k is a name the publisher or NATS owns:
// Event.Headers documents "Nats-" and "Outbox-" names as reserved.
func isReservedHeader(k string) bool {
	k = strings.ToLower(k)
	return strings.HasPrefix(k, "nats-") || strings.HasPrefix(k, "outbox-")
}
