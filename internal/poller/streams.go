package poller

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgnats/outbox/schema"
)

// The stream cache holds the account's streams with their subject filters,
// read with one JetStream API request (a page of up to 256 streams), and
// matches each subject against the filters locally. A new subject, such as
// a per-entity one (order.<id>.created), costs no request.
const (
	// streamTTL bounds how long the stream list is trusted without asking
	// JetStream again.
	streamTTL = 30 * time.Second
	// streamRecheck is how soon after reading the list a subject that no
	// stream covers, or a publish error suggesting the streams changed,
	// makes the cache read it again.
	streamRecheck = 100 * time.Millisecond
	// subjectsKept bounds the subjects whose stream is remembered; past it
	// the memo starts over (matching again costs no request).
	subjectsKept = 4096
)

type streamInfo struct {
	name       string
	subjects   []string // subject filters, with NATS wildcards
	maxMsgSize int      // 0: no limit beyond the server's max_payload
	duplicates time.Duration
	noAck      bool // the stream never answers a publish with a PubAck
}

// streamCache maps subjects to the stream that stores them. Only the
// publish loop uses it, so it has no lock.
type streamCache struct {
	js      jetstream.JetStream
	streams []streamInfo
	fetched time.Time      // when streams was read; zero: never, or dropped
	stale   bool           // forget was called: read again once streamRecheck has passed
	bySub   map[string]int // subject -> index in streams; -1: no stream
}

func newStreamCache(js jetstream.JetStream) *streamCache {
	return &streamCache{js: js}
}

// errNoStream means JetStream answered that no stream covers the subject.
var errNoStream = errors.New("no JetStream stream covers the subject")

// lookup returns the stream covering subject, errNoStream when none of the
// account's streams does, or another error when JetStream could not be
// asked.
func (c *streamCache) lookup(ctx context.Context, subject string) (streamInfo, error) {
	age := time.Since(c.fetched)
	if c.fetched.IsZero() || age >= streamTTL || c.stale && age >= streamRecheck {
		if err := c.refresh(ctx); err != nil {
			return streamInfo{}, err
		}
	}
	if i := c.match(subject); i >= 0 {
		return c.streams[i], nil
	}
	if time.Since(c.fetched) < streamRecheck {
		return streamInfo{}, errNoStream
	}
	// Perhaps a stream was created since: read the list again.
	if err := c.refresh(ctx); err != nil {
		return streamInfo{}, err
	}
	if i := c.match(subject); i >= 0 {
		return c.streams[i], nil
	}
	return streamInfo{}, errNoStream
}

// match returns the index of the stream whose filters match subject, or -1.
// JetStream refuses streams with overlapping subjects in one account, so at
// most one does.
func (c *streamCache) match(subject string) int {
	if i, ok := c.bySub[subject]; ok {
		return i
	}
	found := -1
	for i := range c.streams {
		if slices.ContainsFunc(c.streams[i].subjects, func(f string) bool { return subjectMatches(subject, f) }) {
			found = i
			break
		}
	}
	if len(c.bySub) >= subjectsKept {
		clear(c.bySub)
	}
	c.bySub[subject] = found
	return found
}

// refresh reads every stream of the account with its subject filters.
func (c *streamCache) refresh(ctx context.Context) error {
	var streams []streamInfo
	l := c.js.ListStreams(ctx)
	for info := range l.Info() {
		cfg := info.Config
		if len(cfg.Subjects) == 0 {
			continue // a mirror or a stream that only sources others
		}
		streams = append(streams, streamInfo{name: cfg.Name, subjects: cfg.Subjects,
			maxMsgSize: int(cfg.MaxMsgSize), duplicates: cfg.Duplicates, noAck: cfg.NoAck})
	}
	if err := l.Err(); err != nil {
		return fmt.Errorf("list JetStream streams: %w", err)
	}
	c.streams, c.fetched, c.stale, c.bySub = streams, time.Now(), false, make(map[string]int)
	return nil
}

// forget marks the stream list as possibly out of date, after a publish to
// subject failed in a way that suggests the streams changed. It is read
// again at the next lookup, at most once per streamRecheck.
func (c *streamCache) forget(string) { c.stale = true }

// subjectMatches reports whether the subject (without wildcards) matches
// filter under NATS rules: tokens separated by dots, "*" matching one
// token, and a final ">" matching one or more.
func subjectMatches(subject, filter string) bool {
	for {
		ft, frest, fmore := strings.Cut(filter, ".")
		if ft == ">" && !fmore {
			return subject != ""
		}
		st, srest, smore := strings.Cut(subject, ".")
		if ft != "*" && ft != st {
			return false
		}
		if !fmore || !smore {
			return fmore == smore
		}
		filter, subject = frest, srest
	}
}

// CheckStreams compares the subjects the events table uses with the
// streams that cover them and logs, for an operator, each subject no
// stream covers, each covering stream configured with no_ack (its events
// are FAILED unsent), and each covering stream whose duplicate window is
// shorter than horizon (the longest time after which this publisher may send an
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
		cfg := s.CachedInfo().Config
		if cfg.NoAck {
			log.Warn("stream is configured with no_ack: it never acknowledges a publish, so the publisher FAILS every event whose subject it covers without sending it",
				"stream", stream, "fix", "set no_ack to false on the stream, or move the subjects to a stream that acknowledges")
		}
		if d := cfg.Duplicates; d < horizon {
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
			log.Warn("no JetStream stream covers a subject the events table uses; its events will be retried and then FAILED unless a subject mapping sends them to a stream",
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
