package bench

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"
)

// The scale scenarios Config.ScaleCases selects.
const (
	CaseBacklog   = "backlog"   // a long READY backlog: is the rate steady to the end?
	CaseBlocked   = "blocked"   // many entities blocked by a FAILED event
	CaseEntities  = "entities"  // the backlog over many more entities
	CaseRetention = "retention" // retention deleting old rows while draining
)

// ScaleCaseNames lists the scale scenarios in the order Run measures them.
var ScaleCaseNames = []string{CaseBacklog, CaseBlocked, CaseEntities, CaseRetention}

// DrainStat is one drain of a scale measurement: its rate, its CPU per
// event, and the latency of the publisher's claims during it.
type DrainStat struct {
	EventsPerSec float64      `json:"events_per_sec"`
	Cost         cost         `json:"cost"`
	Claims       ClaimLatency `json:"claim_ms"`
}

func statOf(d drainResult) DrainStat {
	return DrainStat{EventsPerSec: d.eventsPerSec, Cost: d.cost, Claims: d.claims}
}

// ScaleCases are the results of the scale scenarios run; nil for those
// not asked for.
type ScaleCases struct {
	Backlog   *BacklogCase   `json:"backlog,omitempty"`
	Blocked   *BlockedCase   `json:"blocked,omitempty"`
	Entities  *EntitiesCase  `json:"entities,omitempty"`
	Retention *RetentionCase `json:"retention,omitempty"`
}

// BacklogCase is the drain of a long READY backlog written in bulk (and
// analyzed) before the publisher starts, with the rates over its first and
// last tenth (Window events each).
type BacklogCase struct {
	Events int `json:"events"`
	Window int `json:"window"`
	DrainStat
	First       float64      `json:"first_events_per_sec"`
	Last        float64      `json:"last_events_per_sec"`
	LastVsFirst float64      `json:"last_vs_first"`
	ClaimsFirst ClaimLatency `json:"claim_ms_first"`
	ClaimsLast  ClaimLatency `json:"claim_ms_last"`
}

// BlockedCase is the drain of the backlog in a table that also holds
// Entities blocked entities, each with a FAILED event followed by
// EventsBehind READY events, all below the backlog; Baseline is the same
// backlog without them, in the same run.
type BlockedCase struct {
	Entities     int `json:"blocked_entities"`
	EventsBehind int `json:"ready_events_behind_each"`
	Backlog      int `json:"backlog_events"`
	DrainStat
	Baseline   DrainStat `json:"baseline"`
	VsBaseline float64   `json:"vs_baseline"`
}

// EntitiesCase is the drain of the backlog spread over Entities entities;
// Baseline is the same backlog over BaselineEntities (Config.Entities), in
// the same run.
type EntitiesCase struct {
	Entities         int `json:"entities"`
	BaselineEntities int `json:"baseline_entities"`
	Backlog          int `json:"backlog_events"`
	DrainStat
	Baseline   DrainStat `json:"baseline"`
	VsBaseline float64   `json:"vs_baseline"`
}

// RetentionCase is the drain of the backlog in a table holding OldRows
// SUCCESS rows past the retention, without and then with the publisher's
// retention chore deleting them meanwhile, and what the chore deleted.
// KeepsUp says whether it deleted rows at least as fast as the drain made
// SUCCESS rows.
type RetentionCase struct {
	OldRows       int       `json:"old_success_rows"`
	Backlog       int       `json:"backlog_events"`
	Without       DrainStat `json:"without_retention"`
	With          DrainStat `json:"with_retention"`
	WithVsWithout float64   `json:"with_vs_without"`
	Deleted       int64     `json:"deleted_rows"`
	DeletedPerSec float64   `json:"deleted_rows_per_sec"`
	KeepsUp       bool      `json:"keeps_up"`
}

// checkScaleCases refuses names Run does not know.
func checkScaleCases(names []string) error {
	for _, n := range names {
		if !slices.Contains(ScaleCaseNames, n) {
			return fmt.Errorf("unknown scale case %q (known: %s)", n, strings.Join(ScaleCaseNames, ", "))
		}
	}
	return nil
}

// scaleCases runs the scenarios cfg.ScaleCases names.
func (e *env) scaleCases(ctx context.Context) (*ScaleCases, error) {
	cfg := e.cfg
	out := &ScaleCases{}
	want := func(name string) bool { return slices.Contains(cfg.ScaleCases, name) }
	drain := func(what string, r drainRun) (drainResult, error) {
		r.batch, r.timeClaims, r.settle = cfg.BatchSize, true, true
		d, err := e.drainCost(ctx, r)
		if err != nil {
			return d, fmt.Errorf("%s: %w", what, err)
		}
		return d, nil
	}
	if want(CaseBacklog) {
		n := cfg.ScaleBacklog
		d, err := drain(fmt.Sprintf("drain of a %d-event backlog", n), drainRun{events: n, bulk: true, window: max(n/10, 1)})
		if err != nil {
			return nil, err
		}
		out.Backlog = &BacklogCase{Events: n, Window: max(n/10, 1), DrainStat: statOf(d),
			First: d.first, Last: d.last, LastVsFirst: d.last / d.first, ClaimsFirst: d.claimsFirst, ClaimsLast: d.claimsLast}
	}
	// The blocked and entities cases compare with the same baseline.
	var baseline *DrainStat
	base := func() (DrainStat, error) {
		if baseline == nil {
			d, err := drain("baseline drain", drainRun{})
			if err != nil {
				return DrainStat{}, err
			}
			s := statOf(d)
			baseline = &s
		}
		return *baseline, nil
	}
	if want(CaseBlocked) {
		b, err := base()
		if err != nil {
			return nil, err
		}
		d, err := drain(fmt.Sprintf("drain past %d blocked entities", cfg.ScaleBlocked), drainRun{blocked: cfg.ScaleBlocked})
		if err != nil {
			return nil, err
		}
		out.Blocked = &BlockedCase{Entities: cfg.ScaleBlocked, EventsBehind: blockedBehind, Backlog: cfg.Events,
			DrainStat: statOf(d), Baseline: b, VsBaseline: d.eventsPerSec / b.EventsPerSec}
	}
	if want(CaseEntities) {
		b, err := base()
		if err != nil {
			return nil, err
		}
		d, err := drain(fmt.Sprintf("drain over %d entities", cfg.ScaleEntities), drainRun{entities: cfg.ScaleEntities})
		if err != nil {
			return nil, err
		}
		out.Entities = &EntitiesCase{Entities: cfg.ScaleEntities, BaselineEntities: cfg.Entities, Backlog: cfg.Events,
			DrainStat: statOf(d), Baseline: b, VsBaseline: d.eventsPerSec / b.EventsPerSec}
	}
	if want(CaseRetention) {
		n := cfg.ScaleRetentionRows
		without, err := drain(fmt.Sprintf("drain over %d old rows", n), drainRun{success: n, old: true})
		if err != nil {
			return nil, err
		}
		// The same table, with a second backlog on top.
		with, err := drain(fmt.Sprintf("drain over %d old rows, retention on", n), drainRun{keep: true, retention: true})
		if err != nil {
			return nil, err
		}
		out.Retention = &RetentionCase{OldRows: n, Backlog: cfg.Events, Without: statOf(without), With: statOf(with),
			WithVsWithout: with.eventsPerSec / without.eventsPerSec,
			Deleted:       with.retention.deleted, DeletedPerSec: with.retention.perSec,
			KeepsUp: with.retention.perSec >= with.eventsPerSec}
	}
	return out, nil
}

func (c Config) scaleDefaults() Config {
	c.ScaleBacklog = cmp.Or(c.ScaleBacklog, 1_000_000)
	c.ScaleBlocked = cmp.Or(c.ScaleBlocked, 10_000)
	c.ScaleEntities = cmp.Or(c.ScaleEntities, 100_000)
	c.ScaleRetentionRows = cmp.Or(c.ScaleRetentionRows, 10_000_000)
	return c
}
