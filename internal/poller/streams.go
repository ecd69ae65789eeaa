package poller

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// streamTTL bounds how long a subject's stream is trusted without asking
// JetStream again.
const streamTTL = 30 * time.Second

type streamInfo struct {
	name       string
	maxMsgSize int // 0: no limit beyond the server's max_payload
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
	si := streamInfo{name: name, maxMsgSize: int(s.CachedInfo().Config.MaxMsgSize), fetched: time.Now()}
	c.bySub[subject] = si
	return si, nil
}

// forget drops a subject's cached stream, after a publish to it failed in a
// way that suggests the streams changed.
func (c *streamCache) forget(subject string) { delete(c.bySub, subject) }
