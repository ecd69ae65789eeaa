package poller

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgnats/outbox/schema"
)

// streamTTL bounds how long a subject's stream is trusted without asking
// JetStream again.
const streamTTL = 30 * time.Second

type streamInfo struct {
	name       string
	maxMsgSize int // 0: no limit beyond the server's max_payload
	duplicates time.Duration
	fetched    time.Time
}

// streamCache maps subjects to the stream that stores them. Only the
// publish loop uses it, so it has no lock. Only positive answers are kept:
// a subject with no stream is asked about again each time.
type streamCache struct {
	js    jetstream.JetStream
	bySub map[string]streamInfo
}

func newStreamCache(js jetstream.JetStream) *streamCache {
	return &streamCache{js: js, bySub: map[string]streamInfo{}}
}

// errNoStream means JetStream answered that no stream covers the subject.
var errNoStream = errors.New("no JetStream stream covers the subject")

// lookup returns the stream covering subject, errNoStream when JetStream
// says none does, or another error when JetStream could not be asked.
func (c *streamCache) lookup(ctx context.Context, subject string) (streamInfo, error) {
	if si, ok := c.bySub[subject]; ok && time.Since(si.fetched) < streamTTL {
		return si, nil
	}
	name, err := c.js.StreamNameBySubject(ctx, subject)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		delete(c.bySub, subject)
		return streamInfo{}, errNoStream
	}
	if err != nil {
		return streamInfo{}, fmt.Errorf("look up stream for %q: %w", subject, err)
	}
	s, err := c.js.Stream(ctx, name)
	if err != nil {
		return streamInfo{}, fmt.Errorf("read stream %q: %w", name, err)
	}
	cfg := s.CachedInfo().Config
	si := streamInfo{name: name, maxMsgSize: int(cfg.MaxMsgSize), duplicates: cfg.Duplicates, fetched: time.Now()}
	c.bySub[subject] = si
	return si, nil
}

// forget drops a subject's cached stream, after a publish to it failed in a
// way that suggests the streams changed.
func (c *streamCache) forget(subject string) { delete(c.bySub, subject) }

// CheckStreams compares the subjects the events table uses with the
// streams that cover them and logs, for an operator, each subject no
// stream covers and each covering stream whose duplicate window is shorter
// than horizon (the longest time after which this publisher may send an
// event again). The subjects are those of the oldest READY events and of
// the most recent events of any status (at most checkSubjectRows rows of
// each, checkSubjects distinct subjects), so an empty backlog still checks
// the streams the table publishes to. streams names further streams to
// check whatever the rows say, such as the one --create-stream made; one
// that does not exist is warned about. It returns an error only when the
// database or JetStream cannot be asked.
func CheckStreams(ctx context.Context, db *sql.DB, js jetstream.JetStream, table string, horizon time.Duration, log *slog.Logger, streams ...string) error {
	name, err := schema.ParseName(table)
	if err != nil {
		return err
	}
	t := name.Quoted()
	rows, err := db.QueryContext(ctx, `SELECT DISTINCT event_target FROM (
		(SELECT event_target FROM `+t+` WHERE event_status = 'READY' ORDER BY seq LIMIT $1)
		UNION ALL
		(SELECT event_target FROM `+t+` ORDER BY seq DESC LIMIT $1)) r
		LIMIT $2`, checkSubjectRows, checkSubjects)
	if err != nil {
		return fmt.Errorf("read subjects: %w", err)
	}
	var subjects []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			rows.Close()
			return err
		}
		subjects = append(subjects, s)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return err
	}

	// Asked directly rather than through the publish loop's cache: each
	// stream's configuration is read once, here.
	checked := map[string]bool{}
	check := func(stream string) error {
		if checked[stream] {
			return nil
		}
		checked[stream] = true
		s, err := js.Stream(ctx, stream)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			log.Warn("stream named at start does not exist", "stream", stream)
			return nil
		}
		if err != nil {
			return fmt.Errorf("read stream %q: %w", stream, err)
		}
		if d := s.CachedInfo().Config.Duplicates; d < horizon {
			log.Warn("stream's duplicate window is shorter than the publisher's retry horizon; a re-sent event may be stored twice (pkg/dedup still drops it)",
				"stream", stream, "duplicate_window", d, "retry_horizon", horizon)
		}
		return nil
	}
	for _, stream := range streams {
		if err := check(stream); err != nil {
			return err
		}
	}
	for _, subj := range subjects {
		stream, err := js.StreamNameBySubject(ctx, subj)
		switch {
		case errors.Is(err, jetstream.ErrStreamNotFound):
			log.Warn("no JetStream stream covers a subject the events table uses; its new events will be retried and then FAILED",
				"subject", subj, "fix", "create a stream for it, or run publisher with --create-stream")
			continue
		case err != nil:
			return fmt.Errorf("look up stream for %q: %w", subj, err)
		}
		if err := check(stream); err != nil {
			return err
		}
	}
	return nil
}

// Bounds of CheckStreams's look at the events table.
const (
	checkSubjectRows = 10000
	checkSubjects    = 100
)
