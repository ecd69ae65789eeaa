package poller

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgnats/outbox/schema"
)

// recentRows is how many of the newest events RecentStreams reads the
// subjects of.
const recentRows = 10000

// StreamAge is a JetStream stream that stores the subject of recent events,
// with how long it keeps messages.
type StreamAge struct {
	Name    string
	Subject string        // one recent event's subject the stream covers
	MaxAge  time.Duration // 0: the stream keeps messages without a time limit
}

// ErrProcessedRetentionTooShort is wrapped by CheckProcessedRetention's
// error.
var ErrProcessedRetentionTooShort = errors.New("processed-message retention is shorter than a stream's max_age")

// CheckProcessedRetention reports, with an error wrapping
// ErrProcessedRetentionTooShort, a processed-message retention shorter
// than the time stream s keeps messages: a message redelivered or read
// again after its processed_message row was deleted would be processed a
// second time. A stream with max_age 0 keeps messages without a limit, so
// any positive retention is too short for it. A retention of 0 (rows kept)
// always passes.
func CheckProcessedRetention(retention time.Duration, s StreamAge) error {
	switch {
	case retention <= 0:
		return nil
	case s.MaxAge <= 0:
		return fmt.Errorf("%w: stream %s (covering %q) has max_age 0 (unlimited) and keeps messages forever, so any finite retention such as %s is too short",
			ErrProcessedRetentionTooShort, s.Name, s.Subject, retention)
	case retention < s.MaxAge:
		return fmt.Errorf("%w: stream %s (covering %q) keeps messages for %s (max_age), longer than the retention %s",
			ErrProcessedRetentionTooShort, s.Name, s.Subject, s.MaxAge, retention)
	}
	return nil
}

// RecentStreams returns the streams that store the subjects of the newest
// 10000 events of table, each once. Subjects no stream covers are left
// out. It returns an error when the database or JetStream cannot be asked.
func RecentStreams(ctx context.Context, db *sql.DB, js jetstream.JetStream, table string) ([]StreamAge, error) {
	name, err := schema.ParseName(table)
	if err != nil {
		return nil, err
	}
	rows, err := db.QueryContext(ctx, `SELECT DISTINCT event_target FROM (
		SELECT event_target FROM `+name.Quoted()+` ORDER BY seq DESC LIMIT $1) r
		LIMIT 1000`, recentRows)
	if err != nil {
		return nil, fmt.Errorf("read recent subjects: %w", err)
	}
	var subjects []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			rows.Close()
			return nil, fmt.Errorf("read recent subjects: %w", err)
		}
		subjects = append(subjects, s)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read recent subjects: %w", err)
	}
	var out []StreamAge
	seen := map[string]bool{}
	for _, subject := range subjects {
		stream, err := js.StreamNameBySubject(ctx, subject)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("look up stream for %q: %w", subject, err)
		}
		if seen[stream] {
			continue
		}
		seen[stream] = true
		s, err := js.Stream(ctx, stream)
		if err != nil {
			return nil, fmt.Errorf("read stream %q: %w", stream, err)
		}
		out = append(out, StreamAge{Name: stream, Subject: subject, MaxAge: s.CachedInfo().Config.MaxAge})
	}
	return out, nil
}
