package outbox

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/pgnats/outbox/internal/wire"
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
// whitespace, control characters or the wildcards '*' and '>'. Write also
// bounds a subject's length (see Event.Subject).
func ValidateSubject(s string) error { return wire.CheckSubject(s) }

// prepared is an event that passed validation, ready for the INSERT.
type prepared struct {
	subject string
	data    []byte
	headers []byte
}

// prepare validates ev and encodes its payload and headers. The rule of
// what can be published is wire.Build's, the one the publisher applies to
// every row again before sending: here with the values the publisher adds
// (event id, seq, creation time) at their longest.
func (w *Writer) prepare(i int, ev Event) (prepared, error) {
	bad := func(field, reason string, args ...any) (prepared, error) {
		return prepared{}, &ValidationError{Index: i, Field: field, Reason: fmt.Sprintf(reason, args...)}
	}
	data, dataErr := encodeData(ev.Data, ev.ContentType)
	msg, _, err := wire.Build(wire.Worst(wire.Event{
		Subject: ev.Subject, Type: ev.Type, EntityType: ev.EntityType, EntityID: ev.EntityID,
		Data: data, Headers: ev.Headers,
	}), w.maxBytes, w.maxLine)
	var werr *wire.Error
	switch {
	case errors.As(err, &werr) && (dataErr == nil || werr.Field != "Data"):
		return bad(werr.Field, "%s", werr.Reason)
	case dataErr != nil:
		return bad("Data", "%v", dataErr)
	case err != nil:
		return prepared{}, fmt.Errorf("outbox: event %d: %w", i, err)
	}
	headers, err := json.Marshal(ev.Headers)
	if err != nil {
		return bad("Headers", "%v", err)
	}
	if ev.Headers == nil {
		headers = []byte("{}")
	}
	return prepared{subject: msg.Subject, data: data, headers: headers}, nil
}
