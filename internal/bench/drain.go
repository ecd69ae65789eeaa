package bench

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/pgnats/outbox/internal/poller"
)

// drain pre-writes the backlog and measures how fast a publisher empties
// it: with skipPublish, claim and mark alone (the database's ceiling);
// without, the real loop.
func (e *env) drain(ctx context.Context, skipPublish bool, batch int) (float64, error) {
	if err := e.reset(ctx); err != nil {
		return 0, err
	}
	if err := e.prewrite(ctx, e.cfg.Events, e.prefix+".drain"); err != nil {
		return 0, err
	}
	p, err := poller.New(poller.Config{
		DB: e.db.DB, DSN: e.dsn, NATS: e.nc, BatchSize: batch, SkipPublish: skipPublish,
	})
	if err != nil {
		return 0, err
	}
	name := fmt.Sprintf("drain, batch %d", batch)
	if skipPublish {
		name = "claim+mark only"
	}
	rctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	start := time.Now()
	go func() {
		defer wg.Done()
		_ = p.Run(rctx)
	}()
	defer func() { cancel(); wg.Wait() }()
	e.prog.start(name, e.cfg.Events)
	err = waitFor(ctx, 10*time.Minute, func() (bool, error) {
		n := int(p.Stats().Published)
		e.prog.set(n)
		return n >= e.cfg.Events, nil
	})
	elapsed := time.Since(start)
	e.prog.done()
	if err != nil {
		return 0, err
	}
	return float64(e.cfg.Events) / elapsed.Seconds(), nil
}
