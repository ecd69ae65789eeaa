package dedup_test

import (
	"errors"
	"fmt"
	"io/fs"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/pkg/dedup"
)

func TestPermanent(t *testing.T) {
	t.Parallel()

	t.Run("nil stays nil", func(t *testing.T) {
		t.Parallel()
		require.NoError(t, dedup.Permanent(nil))
	})

	t.Run("matches ErrPermanent and the cause", func(t *testing.T) {
		t.Parallel()
		cause := &fs.PathError{Op: "open", Path: "x", Err: fs.ErrNotExist}
		err := fmt.Errorf("decode order: %w", dedup.Permanent(cause))
		require.ErrorIs(t, err, dedup.ErrPermanent)
		require.ErrorIs(t, err, fs.ErrNotExist)
		var pe *fs.PathError
		require.ErrorAs(t, err, &pe)
		require.Equal(t, "decode order: "+cause.Error(), err.Error())
	})

	t.Run("plain error is not permanent", func(t *testing.T) {
		t.Parallel()
		require.NotErrorIs(t, errors.New("timeout"), dedup.ErrPermanent)
	})
}

func TestKeyError(t *testing.T) {
	t.Parallel()
	err := fmt.Errorf("consume: %w", &dedup.KeyError{Field: "msgID"})
	require.ErrorIs(t, err, dedup.ErrInvalidKey)
	require.EqualError(t, err, "consume: invalid dedup key: msgID must not be empty")
}
