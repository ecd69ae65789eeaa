package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/pgnats/outbox/internal/bench"
	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/internal/redact"
)

func runBench(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var (
		o              common
		natsOpts       natsOptions
		rates          string
		replicas       string
		scale          string
		scaleCases     string
		asJSON, noIdle bool
		sweep          bool
		plotFile       string
		scalePlot      string
		cpuProfile     string
		cfg            bench.Config
	)
	c := newCommand("bench", "", `
Measure the outbox on this machine, on scratch tables and a scratch stream
that are removed afterwards: the database's ceiling for claim-and-mark, the
broker's for publishing, the publisher's drain rate of a pre-written
backlog against a naive serial pipeline over a bare table in the same run,
the CPU per event of the publisher and of PostgreSQL, the database round
trips per batch, commit-to-consumer latency at offered rates, writer throughput
with the NOTIFY trigger on and off, and an idle publisher's CPU and memory.
Takes about a minute with the defaults.`)
	o.register(c)
	natsOpts.register(c, "NATS server URL")
	c.Int(&cfg.Events, "events", 50000, "events in the backlog to drain")
	c.Int(&cfg.Payload, "payload", 256, "payload bytes per event")
	c.Int(&cfg.Entities, "entities", 1000, "entities the events spread over")
	c.Int(&cfg.BatchSize, "batch-size", 500, "publisher batch size")
	c.String(&rates, "rates", "2000", "comma-separated offered rates (events/s) for the latency runs")
	c.Duration(&cfg.Duration, "duration", 20*time.Second, "length of each latency run")
	c.Int(&cfg.Writers, "writers", 4, "concurrent writers in the writer-throughput runs")
	c.String(&replicas, "replicas", "", "also drain the backlog with each of these numbers of publishers run with --partitions, e.g. 1,2,3 (in this process, each on its own NATS connection)")
	c.String(&scale, "scale", "", "also drain the backlog in a table already holding each of these numbers of SUCCESS rows, e.g. 0,1000000, with the claim latency (p50, p99 in ms) at each")
	c.String(&scalePlot, "scale-plot", "", "with --scale: write a PNG plot of drain rate, PostgreSQL CPU per event and claim latency against table size to this file")
	c.String(&scaleCases, "scale-cases", "", "also run these scale scenarios, comma-separated, each with drain rate, CPU per event and claim latency: "+
		"backlog (drain a --scale-backlog READY backlog written in bulk; rates over its first and last tenth), "+
		"blocked (drain the --events backlog past --scale-blocked entities each blocked by a FAILED event with 3 READY events behind it, against the same backlog without them), "+
		"entities (the --events backlog over --scale-entities entities, against --entities), "+
		"retention (the --events backlog over --scale-retention-rows SUCCESS rows published two days ago, without and then with the retention chore deleting them (retention 24h, schedule @every 1s); its deleted rows/s)")
	c.Int(&cfg.ScaleBacklog, "scale-backlog", 1000000, "with --scale-cases backlog: READY events in the backlog (rates over the first and last tenth)")
	c.Int(&cfg.ScaleBlocked, "scale-blocked", 10000, "with --scale-cases blocked: entities blocked by a FAILED event")
	c.Int(&cfg.ScaleEntities, "scale-entities", 100000, "with --scale-cases entities: entities the backlog spreads over")
	c.Int(&cfg.ScaleRetentionRows, "scale-retention-rows", 10000000, "with --scale-cases retention: SUCCESS rows past the retention in the table (10M take minutes to write)")
	c.Int(&cfg.Partitions, "partitions", 12, "with --replicas: the partition count")
	c.Int(&cfg.StreamReplicas, "stream-replicas", 1, "replicas of the scratch stream (3 on a JetStream cluster measures a replicated stream; --nats-url may list every node)")
	c.Bool(&noIdle, "no-idle", false, "skip the idle CPU and memory measurement")
	c.Bool(&sweep, "sweep", false, "also sweep latency over 500..20000 events/s and drain over batch sizes 50..2000")
	c.Duration(&cfg.SweepDuration, "sweep-duration", 5*time.Second, "with --sweep: length of each latency run")
	c.String(&plotFile, "plot", "", "with --sweep: write a PNG plot of the sweep to this file")
	c.String(&cpuProfile, "cpuprofile", "", "write a CPU profile of the bench process (writers, publisher loop, consumer) to this file")
	c.Bool(&asJSON, "json", false, "print one JSON object")
	if err := c.parse(args, stdout); err != nil {
		return err
	}
	err := natsOpts.check("bench")
	if err != nil {
		return err
	}
	if cfg.Events < 1 || cfg.Payload < 2 || cfg.Entities < 1 || cfg.BatchSize < 1 || cfg.Writers < 1 || cfg.Duration <= 0 ||
		cfg.StreamReplicas < 1 || cfg.StreamReplicas > 5 {
		return usagef("bench: --events, --entities, --batch-size and --writers must be at least 1, --payload at least 2, --duration positive, --stream-replicas 1 to 5")
	}
	if cfg.Rates, err = positiveInts("rates", rates); err != nil {
		return err
	}
	if replicas != "" {
		if cfg.Replicas, err = positiveInts("replicas", replicas); err != nil {
			return err
		}
	}
	if scale != "" {
		for _, v := range strings.Split(scale, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil || n < 0 {
				return usagef("bench: --scale %q: use numbers of rows separated by commas", scale)
			}
			cfg.Scale = append(cfg.Scale, n)
		}
	}
	if scaleCases != "" {
		for _, v := range strings.Split(scaleCases, ",") {
			v = strings.TrimSpace(v)
			if !slices.Contains(bench.ScaleCaseNames, v) {
				return usagef("bench: --scale-cases %q: use some of %s, separated by commas", scaleCases, strings.Join(bench.ScaleCaseNames, ","))
			}
			cfg.ScaleCases = append(cfg.ScaleCases, v)
		}
	}
	if cfg.ScaleBacklog < 10 || cfg.ScaleBlocked < 1 || cfg.ScaleEntities < 1 || cfg.ScaleRetentionRows < 1 {
		return usagef("bench: --scale-backlog must be at least 10, --scale-blocked, --scale-entities and --scale-retention-rows at least 1")
	}
	if cfg.Partitions < 1 || cfg.Partitions > poller.MaxPartitions {
		return usagef("bench: --partitions must be between 1 and %d", poller.MaxPartitions)
	}
	if scalePlot != "" && scale == "" {
		return usagef("bench: --scale-plot needs --scale")
	}
	if plotFile != "" && !sweep {
		return usagef("bench: --plot needs --sweep")
	}
	if sweep {
		cfg.SweepRates = []int{500, 1000, 2000, 5000, 10000, 20000}
		cfg.SweepBatches = []int{50, 100, 250, 500, 1000, 2000}
	}
	cfg.DatabaseURL, cfg.NATSURL = o.databaseURL, natsOpts.url
	nopts, err := natsOpts.options()
	if err != nil {
		return err
	}
	cfg.NATSOptions, cfg.NATSURLShown, cfg.PublisherEnv = nopts, redact.NATS(natsOpts.url), natsOpts.env()
	cfg.Progress, cfg.TTY = stderr, isTerminal(stderr)
	if !noIdle {
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("find the publisher binary for the idle measurement: %w (or pass --no-idle)", err)
		}
		cfg.PublisherBin = exe
	}
	if cpuProfile != "" {
		f, err := os.Create(cpuProfile)
		if err != nil {
			return fmt.Errorf("cpu profile: %w", err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("cpu profile: %w", err)
		}
		defer pprof.StopCPUProfile()
	}
	res, err := bench.Run(ctx, cfg)
	if err != nil {
		return err
	}
	if plotFile != "" {
		if err := writePlot(plotFile, res.Sweep); err != nil {
			return err
		}
	}
	if scalePlot != "" {
		f, err := os.Create(scalePlot)
		if err != nil {
			return fmt.Errorf("plot: %w", err)
		}
		err = bench.PlotScale(f, res.Scale, cfg.Events)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	}
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	printBench(stdout, res)
	return nil
}

// positiveInts parses a comma-separated list of positive integers.
func positiveInts(flagName, list string) ([]int, error) {
	var out []int
	for _, r := range strings.Split(list, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(r))
		if err != nil || n < 1 {
			return nil, usagef("bench: --%s %q: use positive integers separated by commas", flagName, list)
		}
		out = append(out, n)
	}
	return out, nil
}

func writePlot(path string, s *bench.Sweep) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("plot: %w", err)
	}
	if err := bench.Plot(f, s); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func printBench(w io.Writer, r *bench.Result) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	m := r.Machine
	fmt.Fprintf(w, "machine: %s, %d cores, %s, PostgreSQL %s, NATS %s (%s storage, %d replica(s))\n",
		m.CPU, m.Cores, m.OS, m.Postgres, m.NATS, m.Storage, m.Replicas)
	fmt.Fprintf(w, "workload: %d events, %d-byte payloads, %d entities, batch %d\n\n",
		r.Settings.Events, r.Settings.Payload, r.Settings.Entities, r.Settings.BatchSize)
	fmt.Fprintf(tw, "database limit (claim+mark)\t%.0f\tevents/s\t\n", r.DBLimit)
	fmt.Fprintf(tw, "NATS limit (async publish)\t%.0f\tevents/s\t\n", r.NATSLimit)
	fmt.Fprintf(tw, "publisher drain\t%.0f\tevents/s\t\n", r.Drain)
	fmt.Fprintf(tw, "drain ratio\t%.2f\t\t\n", r.DrainRatio)
	fmt.Fprintf(tw, "bare claim+mark (one partial index)\t%.0f\tevents/s\t\n", r.BareDB)
	fmt.Fprintf(tw, "database limit vs bare\t%.2f\t\t\n", r.DBLimitVsBare)
	fmt.Fprintf(tw, "reference pipeline (serial, bare table)\t%.0f\tevents/s\t\n", r.Reference)
	fmt.Fprintf(tw, "drain vs reference\t%.2f\t\t\n", r.DrainVsReference)
	fmt.Fprintf(tw, "drain CPU, publisher\t%.1f\tµs/event\t\n", r.DrainCost.PublisherUS)
	fmt.Fprintf(tw, "drain CPU, PostgreSQL\t%.1f\tµs/event\t\n", r.DrainCost.PostgresUS)
	fmt.Fprintf(tw, "reference CPU, pipeline\t%.1f\tµs/event\t\n", r.ReferenceCost.PublisherUS)
	fmt.Fprintf(tw, "reference CPU, PostgreSQL\t%.1f\tµs/event\t\n", r.ReferenceCost.PostgresUS)
	fmt.Fprintf(tw, "database round trips\t%.1f\tper batch\t\n", r.RoundTripsPerBatch)
	for _, d := range r.Replicas {
		fmt.Fprintf(tw, "drain, replicas=%d partitions=%d\t%.0f\tevents/s\t\n", d.Replicas, d.Partitions, d.EventsPerSec)
	}
	fmt.Fprintf(tw, "writer, NOTIFY on\t%.0f\tevents/s\t\n", r.Write.NotifyOn)
	fmt.Fprintf(tw, "writer, NOTIFY off\t%.0f\tevents/s\t\n", r.Write.NotifyOff)
	if r.IdleCPU != nil {
		fmt.Fprintf(tw, "idle publisher CPU\t%.2f\t%% of a core\t\n", *r.IdleCPU)
		fmt.Fprintf(tw, "idle publisher RSS\t%.1f\tMiB\t\n", *r.RSSMiB)
	}
	for _, sp := range r.Scale {
		printDrainStat(tw, fmt.Sprintf("drain over %d SUCCESS rows", sp.SuccessRows), sp.DrainStat)
	}
	if sc := r.ScaleCases; sc != nil {
		printScaleCases(tw, sc)
	}
	tw.Flush()
	lat := []bench.Latency{r.Latency}
	if len(r.LatencyByRate) > 0 {
		lat = lat[:0]
		for _, l := range r.LatencyByRate {
			lat = append(lat, l)
		}
		slices.SortFunc(lat, func(a, b bench.Latency) int { return a.Rate - b.Rate })
	}
	printLatencies(w, "commit -> consumer latency (ms)", lat)
	if r.Sweep != nil {
		printLatencies(w, "sweep: latency (ms) by offered rate", r.Sweep.Latency)
		fmt.Fprintln(w, "\nsweep: drain by batch size")
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "batch\tevents/s\t")
		for _, d := range r.Sweep.Drain {
			fmt.Fprintf(tw, "%d\t%.0f\t\n", d.BatchSize, d.EventsPerSec)
		}
		tw.Flush()
	}
}

// printDrainStat prints a scale drain: its rate, PostgreSQL's CPU per
// event and the claim latency.
func printDrainStat(tw io.Writer, name string, d bench.DrainStat) {
	fmt.Fprintf(tw, "%s\t%.0f\tevents/s\t\n", name, d.EventsPerSec)
	fmt.Fprintf(tw, "  its CPU, PostgreSQL\t%.1f\tµs/event\t\n", d.Cost.PostgresUS)
	fmt.Fprintf(tw, "  its CPU, publisher\t%.1f\tµs/event\t\n", d.Cost.PublisherUS)
	fmt.Fprintf(tw, "  its claims, p50 / p99\t%.1f / %.1f\tms\t\n", d.Claims.P50, d.Claims.P99)
}

func printScaleCases(tw io.Writer, sc *bench.ScaleCases) {
	if b := sc.Backlog; b != nil {
		printDrainStat(tw, fmt.Sprintf("drain of a %d-event backlog", b.Events), b.DrainStat)
		fmt.Fprintf(tw, "  first %d events\t%.0f\tevents/s\t\n", b.Window, b.First)
		fmt.Fprintf(tw, "  last %d events\t%.0f\tevents/s\t\n", b.Window, b.Last)
		fmt.Fprintf(tw, "  last vs first\t%.2f\t\t\n", b.LastVsFirst)
		fmt.Fprintf(tw, "  claims, first / last, p99\t%.1f / %.1f\tms\t\n", b.ClaimsFirst.P99, b.ClaimsLast.P99)
	}
	if b := sc.Blocked; b != nil {
		printDrainStat(tw, "baseline drain", b.Baseline)
		printDrainStat(tw, fmt.Sprintf("drain past %d blocked entities", b.Entities), b.DrainStat)
		fmt.Fprintf(tw, "  vs baseline\t%.2f\t\t\n", b.VsBaseline)
	}
	if en := sc.Entities; en != nil {
		if sc.Blocked == nil {
			printDrainStat(tw, fmt.Sprintf("baseline drain (%d entities)", en.BaselineEntities), en.Baseline)
		}
		printDrainStat(tw, fmt.Sprintf("drain over %d entities", en.Entities), en.DrainStat)
		fmt.Fprintf(tw, "  vs baseline\t%.2f\t\t\n", en.VsBaseline)
	}
	if rt := sc.Retention; rt != nil {
		printDrainStat(tw, fmt.Sprintf("drain over %d old rows", rt.OldRows), rt.Without)
		printDrainStat(tw, "  same, retention deleting", rt.With)
		fmt.Fprintf(tw, "  with vs without\t%.2f\t\t\n", rt.WithVsWithout)
		fmt.Fprintf(tw, "  retention deleted\t%.0f\trows/s\t\n", rt.DeletedPerSec)
		fmt.Fprintf(tw, "  retention keeps up with the drain\t%v\t\t\n", rt.KeepsUp)
	}
}

func printLatencies(w io.Writer, title string, lat []bench.Latency) {
	fmt.Fprintf(w, "\n%s:\n", title)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "offered/s\tevents/tx\tachieved/s\tp50\tp95\tp99\tmax\t")
	for _, l := range lat {
		fmt.Fprintf(tw, "%d\t%d\t%.0f\t%.2f\t%.2f\t%.2f\t%.2f\t\n", l.Rate, l.EventsPerTx, l.AchievedRate, l.P50, l.P95, l.P99, l.Max)
	}
	tw.Flush()
}
