package main

import (
	"time"
)

// parseTimeFlag reads a --since or --until value: an RFC 3339 time
// ("2026-05-04T10:00:00Z") or a Go duration meaning that long before now
// ("2h", "90m"). Empty is the zero time: no bound.
func parseTimeFlag(cmd, flag, v string, now time.Time) (time.Time, error) {
	if v == "" {
		return time.Time{}, nil
	}
	if t, err := time.Parse(time.RFC3339, v); err == nil {
		return t, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 {
		return time.Time{}, usagef("%s: --%s %q: use an RFC 3339 time (2026-05-04T10:00:00Z) or a duration ago (2h, 30m)", cmd, flag, v)
	}
	return now.Add(-d), nil
}

// parseRange reads --since and --until and checks that the range is not
// empty.
func parseRange(cmd, since, until string, now time.Time) (from, to time.Time, err error) {
	if from, err = parseTimeFlag(cmd, "since", since, now); err != nil {
		return from, to, err
	}
	if to, err = parseTimeFlag(cmd, "until", until, now); err != nil {
		return from, to, err
	}
	if !from.IsZero() && !to.IsZero() && !from.Before(to) {
		return from, to, usagef("%s: --since %s is not before --until %s", cmd, from.Format(time.RFC3339), to.Format(time.RFC3339))
	}
	return from, to, nil
}
