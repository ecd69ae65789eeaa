package dedup

import "errors"

// ErrInvalidKey is matched (errors.Is) by every *KeyError: Process was
// called with an empty consumer or message id and ran no SQL.
var ErrInvalidKey = errors.New("invalid dedup key")

// KeyError says which part of the dedup key Process rejected.
type KeyError struct {
	Field string // "consumer" or "msgID"
}

// Error says which field is empty.
func (e *KeyError) Error() string {
	return "invalid dedup key: " + e.Field + " must not be empty"
}

// Is reports whether target is ErrInvalidKey.
func (e *KeyError) Is(target error) bool { return target == ErrInvalidKey }

// ErrPermanent is matched (errors.Is) by errors wrapped with Permanent.
var ErrPermanent = errors.New("permanent error")

// Permanent marks err as not worth retrying: redelivering the message would
// fail the same way (a malformed payload, a reference to something that will
// never exist). The JetStream handler terminates such a message instead of
// asking for redelivery. The result matches both ErrPermanent and err with
// errors.Is, and reads as err. Permanent(nil) is nil.
func Permanent(err error) error {
	if err == nil {
		return nil
	}
	return &permanentError{err: err}
}

type permanentError struct{ err error }

func (e *permanentError) Error() string        { return e.err.Error() }
func (e *permanentError) Unwrap() error        { return e.err }
func (e *permanentError) Is(target error) bool { return target == ErrPermanent }
