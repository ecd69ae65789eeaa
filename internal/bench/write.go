package bench

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pgnats/outbox/pkg/outbox"
)

// writeThroughput measures writer throughput, one event a transaction from
// concurrent writers, with the NOTIFY trigger enabled and then disabled.
func (e *env) writeThroughput(ctx context.Context) (on, off float64, err error) {
	if on, err = e.writeFor(ctx, "write (NOTIFY on)"); err != nil {
		return 0, 0, err
	}
	if _, err = e.exec(ctx, `ALTER TABLE events DISABLE TRIGGER events_notify`); err != nil {
		return 0, 0, err
	}
	defer e.exec(context.WithoutCancel(ctx), `ALTER TABLE events ENABLE TRIGGER events_notify`) //nolint:errcheck
	if off, err = e.writeFor(ctx, "write (NOTIFY off)"); err != nil {
		return 0, 0, err
	}
	return on, off, nil
}

func (e *env) writeFor(ctx context.Context, name string) (float64, error) {
	if err := e.reset(ctx); err != nil {
		return 0, err
	}
	payload := makePayload(e.cfg.Payload)
	var n atomic.Int64
	var firstErr error
	var once sync.Once
	wctx, cancel := context.WithTimeout(ctx, e.cfg.WriteFor)
	defer cancel()
	var wg sync.WaitGroup
	ticks := int(e.cfg.WriteFor / (100 * time.Millisecond))
	e.prog.start(name, ticks)
	start := time.Now()
	for w := range e.cfg.Writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; wctx.Err() == nil; i++ {
				tx, err := e.db.BeginTx(ctx, nil)
				if err == nil {
					_, err = e.w.Write(ctx, tx, outbox.Event{EntityType: "bench", EntityID: fmt.Sprint(w, "-", i%100),
						Type: "Tick", Subject: e.prefix + ".write", Data: payload})
					if err == nil {
						err = tx.Commit()
					} else {
						tx.Rollback() //nolint:errcheck
					}
				}
				if err != nil {
					once.Do(func() { firstErr = err })
					return
				}
				n.Add(1)
			}
		}()
	}
	for i := 0; i < ticks && wctx.Err() == nil; i++ {
		select {
		case <-wctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
		e.prog.set(i + 1)
	}
	wg.Wait()
	elapsed := time.Since(start)
	e.prog.done()
	if firstErr != nil {
		return 0, firstErr
	}
	return float64(n.Load()) / elapsed.Seconds(), nil
}
