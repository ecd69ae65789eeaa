package main

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestByteSizeFlag(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]int{"1": 1, "512KiB": 512 << 10, "32MiB": 32 << 20, "2GiB": 2 << 30, "1048577": 1<<20 + 1} {
		var s byteSize
		require.NoError(t, s.Set(in), in)
		require.Equal(t, want, int(s), in)
		var again byteSize
		require.NoError(t, again.Set(s.String()), "%s prints as %s, which must parse", in, s.String())
		require.Equal(t, s, again)
	}
	for _, in := range []string{"", "0", "-1MiB", "1.5MiB", "1MB", "MiB", "99999999999GiB"} {
		var s byteSize
		require.Error(t, s.Set(in), in)
	}
}
