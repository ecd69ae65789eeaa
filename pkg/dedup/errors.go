package dedup

import (
	"errors"
	"fmt"
)

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

// ErrNilHandler is returned by Process for a nil handler function, before
// any SQL runs.
var ErrNilHandler = errors.New("dedup: nil handler function")

// ErrHandlerPanic is matched (errors.Is) by every *PanicError.
var ErrHandlerPanic = errors.New("handler panicked")

// PanicError is the error Process returns when the handler panicked. The
// panic was recovered and the transaction rolled back, so neither the
// handler's writes nor the message's record were kept: a later delivery
// runs the handler again. It matches ErrHandlerPanic with errors.Is.
type PanicError struct {
	// Value is what the handler passed to panic.
	Value any
	// Stack is the panicking goroutine's stack trace, as
	// runtime/debug.Stack formats it.
	Stack []byte
}

// Error reads "handler panicked: " and the panic value.
func (e *PanicError) Error() string { return fmt.Sprintf("handler panicked: %v", e.Value) }

// Is reports whether target is ErrHandlerPanic.
func (e *PanicError) Is(target error) bool { return target == ErrHandlerPanic }
