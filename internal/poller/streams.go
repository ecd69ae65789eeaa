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

// CheckStreams compares the subjects of READY events with the streams that
// cover them and logs, for an operator, each subject no stream covers and
// each covering stream whose duplicate window is shorter than horizon (the
// longest time after which this publisher may send an event again). It
// returns an error only when the database or JetStream cannot be asked.
func CheckStreams(ctx context.Context, db *sql.DB, js jetstream.JetStream, table string, horizon time.Duration, log *slog.Logger) error {
	name, err := schema.ParseName(table)
	if err != nil {
		return err
	}
	rows, err := db.QueryContext(ctx, `SELECT DISTINCT event_target FROM (
		SELECT event_target FROM `+name.Quoted()+` WHERE event_status = 'READY' ORDER BY seq LIMIT 10000) r
		LIMIT 100`)
	if err != nil {
		return fmt.Errorf("read pending subjects: %w", err)
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
	c := newStreamCache(js)
	warned := map[string]bool{}
	for _, s := range subjects {
		si, err := c.lookup(ctx, s)
		switch {
		case errors.Is(err, errNoStream):
			log.Warn("no JetStream stream covers a subject with pending events; they will be retried and then FAILED",
				"subject", s, "fix", "create a stream for it, or run publisher with --create-stream")
			continue
		case err != nil:
			return err
		}
		if warned[si.name] {
			continue
		}
		warned[si.name] = true
		if si.duplicates < horizon {
			log.Warn("stream's duplicate window is shorter than the publisher's retry horizon; a re-sent event may be stored twice (pkg/dedup still drops it)",
				"stream", si.name, "duplicate_window", si.duplicates, "retry_horizon", horizon)
		}
	}
	return nil
}
