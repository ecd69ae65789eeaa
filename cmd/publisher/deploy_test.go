package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"
	"go.yaml.in/yaml/v3"

	"github.com/pgnats/outbox/internal/poller"
)

// The files in deploy/ are examples users copy: these tests parse each one
// and check it against the binary it deploys (flags, environment
// variables, HTTP paths) and the metrics and runbook it refers to.

var (
	heading     = regexp.MustCompile(`(?m)^#{1,6} (.+)$`)
	notInAnchor = regexp.MustCompile(`[^a-z0-9 -]`)
	runbookRef  = regexp.MustCompile(`^docs/OPERATIONS\.md#([a-z0-9-]+)$`)
	iniLine     = regexp.MustCompile(`^(?:\[([A-Za-z]+)\]|([A-Za-z][A-Za-z0-9]*)=(.*))$`)
	envLine     = regexp.MustCompile(`^#? ?([A-Z][A-Z0-9_]*)=(.*)$`)
)

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile("../../" + path)
	require.NoError(t, err)
	return b
}

// anchors returns the GitHub anchors of a Markdown file's headings.
func anchors(t *testing.T, path string) map[string]bool {
	t.Helper()
	out := map[string]bool{}
	for _, m := range heading.FindAllStringSubmatch(string(readFile(t, path)), -1) {
		a := notInAnchor.ReplaceAllString(strings.ToLower(strings.TrimSpace(m[1])), "")
		out[strings.ReplaceAll(a, " ", "-")] = true
	}
	return out
}

// requireKnownMetrics fails if expr names an outbox metric that does not
// exist.
func requireKnownMetrics(t *testing.T, where, expr string) {
	t.Helper()
	for _, m := range metricInDoc.FindAllString(expr, -1) {
		require.True(t, knownSeries(m), "%s: unknown metric %s in %q", where, m, expr)
	}
}

// runEnvVars returns every environment variable `publisher run` reads.
func runEnvVars(t *testing.T) map[string]bool {
	t.Helper()
	out := map[string]bool{}
	for _, f := range helpFlags(t, "run") {
		for _, e := range f.env {
			out[e] = true
		}
	}
	return out
}

// requireRunArgs checks a `publisher run` command line against the real
// flag set and returns the flags it sets.
func requireRunArgs(t *testing.T, args []string) map[string]string {
	t.Helper()
	require.NotEmpty(t, args)
	require.Equal(t, "run", args[0])
	flags := helpFlags(t, "run")
	set := map[string]string{}
	for i := 1; i < len(args); i++ {
		name, value, hasValue := strings.Cut(strings.TrimPrefix(args[i], "--"), "=")
		require.True(t, strings.HasPrefix(args[i], "--"), "argument %q is not a flag", args[i])
		f, ok := flags[name]
		require.True(t, ok, "publisher run has no flag --%s", name)
		if !hasValue && f.def != "false" && f.def != "true" { // not a bool: the value follows
			i++
			require.Less(t, i, len(args), "--%s needs a value", name)
			value = args[i]
		}
		set[name] = value
	}
	return set
}

func TestPrometheusAlertRules(t *testing.T) {
	t.Parallel()
	var file struct {
		Groups []struct {
			Name  string `yaml:"name"`
			Rules []struct {
				Alert       string            `yaml:"alert"`
				Expr        string            `yaml:"expr"`
				For         string            `yaml:"for"`
				Labels      map[string]string `yaml:"labels"`
				Annotations map[string]string `yaml:"annotations"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	dec := yaml.NewDecoder(bytes.NewReader(readFile(t, "deploy/prometheus/outbox-alerts.yml")))
	dec.KnownFields(true)
	require.NoError(t, dec.Decode(&file))
	runbook := anchors(t, "docs/OPERATIONS.md")
	runbookText := string(readFile(t, "docs/OPERATIONS.md"))
	seen := map[string]bool{}
	for _, g := range file.Groups {
		require.NotEmpty(t, g.Name)
		for _, r := range g.Rules {
			require.NotEmpty(t, r.Alert, "group %s: a rule without alert name", g.Name)
			require.False(t, seen[r.Alert], "alert %s defined twice", r.Alert)
			seen[r.Alert] = true
			require.NotEmpty(t, r.Expr, r.Alert)
			requireKnownMetrics(t, r.Alert, r.Expr)
			_, err := time.ParseDuration(r.For)
			require.NoError(t, err, "%s: for", r.Alert)
			require.Contains(t, []string{"warning", "critical"}, r.Labels["severity"], "%s: severity", r.Alert)
			require.NotEmpty(t, r.Annotations["summary"], r.Alert)
			m := runbookRef.FindStringSubmatch(r.Annotations["runbook"])
			require.NotNil(t, m, "%s: runbook annotation is docs/OPERATIONS.md#section", r.Alert)
			require.True(t, runbook[m[1]], "%s: docs/OPERATIONS.md has no section #%s", r.Alert, m[1])
			require.Contains(t, runbookText, "| `"+r.Alert+"` |", "%s: listed in the runbook's alert table", r.Alert)
		}
	}
	require.Len(t, seen, 11, "alerts")
}

func TestGrafanaDashboard(t *testing.T) {
	t.Parallel()
	type target struct {
		RefID string `json:"refId"`
		Expr  string `json:"expr"`
	}
	type panel struct {
		ID      int    `json:"id"`
		Type    string `json:"type"`
		Title   string `json:"title"`
		GridPos *struct {
			W, H int
		} `json:"gridPos"`
		Targets []target `json:"targets"`
	}
	var dash struct {
		UID           string  `json:"uid"`
		Title         string  `json:"title"`
		SchemaVersion int     `json:"schemaVersion"`
		Panels        []panel `json:"panels"`
		Templating    struct {
			List []struct {
				Name string `json:"name"`
			} `json:"list"`
		} `json:"templating"`
	}
	require.NoError(t, json.Unmarshal(readFile(t, "deploy/grafana/outbox-dashboard.json"), &dash))
	require.NotEmpty(t, dash.UID)
	require.NotEmpty(t, dash.Title)
	require.Positive(t, dash.SchemaVersion)
	vars := map[string]bool{}
	for _, v := range dash.Templating.List {
		vars[v.Name] = true
	}
	ids := map[int]bool{}
	shown := map[string]bool{}
	for _, p := range dash.Panels {
		require.False(t, ids[p.ID], "panel id %d repeats", p.ID)
		ids[p.ID] = true
		require.NotEmpty(t, p.Title, "panel %d", p.ID)
		require.NotNil(t, p.GridPos, "panel %q has a position", p.Title)
		if p.Type == "row" {
			continue
		}
		require.NotEmpty(t, p.Targets, "panel %q queries something", p.Title)
		for _, tg := range p.Targets {
			require.NotEmpty(t, tg.Expr, "panel %q target %s", p.Title, tg.RefID)
			requireKnownMetrics(t, "panel "+p.Title, tg.Expr)
			for _, m := range metricInDoc.FindAllString(tg.Expr, -1) {
				shown[strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(m, "_bucket"), "_sum"), "_count")] = true
			}
			for _, v := range regexp.MustCompile(`\$([a-z_]+)`).FindAllStringSubmatch(tg.Expr, -1) {
				require.True(t, vars[v[1]] || strings.HasPrefix(v[1], "__"), "panel %q uses undefined $%s", p.Title, v[1])
			}
		}
	}
	for _, m := range metricNames() {
		if m != "outbox_backlog_refresh_timestamp_seconds" { // for alerting, not for looking at
			require.True(t, shown[m], "the dashboard shows %s", m)
		}
	}
}

func TestSystemdUnit(t *testing.T) {
	t.Parallel()
	sections := map[string]map[string]string{}
	var cur string
	sc := bufio.NewScanner(bytes.NewReader(readFile(t, "deploy/systemd/outbox-publisher.service")))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";") {
			continue
		}
		m := iniLine.FindStringSubmatch(line)
		require.NotNil(t, m, "line %d is not [Section] or Key=Value: %q", n, line)
		if m[1] != "" {
			cur = m[1]
			sections[cur] = map[string]string{}
			continue
		}
		require.NotEmpty(t, cur, "line %d: a setting before the first section", n)
		sections[cur][m[2]] = m[3]
	}
	for _, s := range []string{"Unit", "Service", "Install"} {
		require.Contains(t, sections, s)
	}
	svc := sections["Service"]
	exec := strings.Fields(svc["ExecStart"])
	require.NotEmpty(t, exec)
	require.True(t, strings.HasPrefix(exec[0], "/") && strings.HasSuffix(exec[0], "/publisher"), "ExecStart runs the publisher by absolute path")
	set := requireRunArgs(t, exec[1:])
	_, _, err := net.SplitHostPort(set["http-addr"])
	require.NoError(t, err, "serves metrics and probes")
	require.Equal(t, "SIGTERM", svc["KillSignal"], "SIGTERM finishes the batch in flight")
	stop, err := time.ParseDuration(svc["TimeoutStopSec"])
	require.NoError(t, err)
	require.Greater(t, stop, 15*time.Second, "longer than the default --ack-timeout plus 10s")
	require.Equal(t, "2", svc["RestartPreventExitStatus"], "a usage error is not retried")
	require.Equal(t, "on-failure", svc["Restart"])

	// The environment file it reads names only variables the publisher
	// knows, set or commented out.
	require.Equal(t, "/etc/outbox/publisher.env", svc["EnvironmentFile"])
	known := runEnvVars(t)
	vars := 0
	set = map[string]string{}
	sc = bufio.NewScanner(bytes.NewReader(readFile(t, "deploy/systemd/publisher.env")))
	for sc.Scan() {
		if m := envLine.FindStringSubmatch(sc.Text()); m != nil {
			vars++
			require.True(t, known[m[1]], "publisher.env: %s is not a variable publisher run reads", m[1])
			if !strings.HasPrefix(sc.Text(), "#") {
				set[m[1]] = strings.Trim(m[2], `"`) // systemd drops the quotes around a value
			}
		}
	}
	require.GreaterOrEqual(t, vars, 2)
	requireHAConnections(t, "publisher.env", set)
}

// requireHAConnections checks the connection settings of a deployment
// example against docs/DEPLOYMENT.md: a database DSN the publisher accepts
// that follows the primary (several hosts with target_session_attrs, or
// one name a failover manager moves), every server of a NATS cluster, and
// a back-off short enough for a database failover.
func requireHAConnections(t *testing.T, where string, env map[string]string) {
	t.Helper()
	dsn := env["DATABASE_URL"]
	require.NoError(t, checkDSN(dsn), "%s: DATABASE_URL", where)
	if strings.Contains(dsn, ",") {
		require.Contains(t, dsn, "target_session_attrs=read-write", "%s: a multi-host DSN must pick the primary", where)
	}
	require.NoError(t, checkNATSURLs("run", env["NATS_URL"]), "%s: NATS_URL", where)
	require.GreaterOrEqual(t, len(strings.Split(env["NATS_URL"], ",")), 3, "%s: every server of a 3-node JetStream cluster", where)
	backoff, err := time.ParseDuration(env["OUTBOX_BACKOFF_MAX"])
	require.NoError(t, err, "%s: OUTBOX_BACKOFF_MAX", where)
	require.LessOrEqual(t, backoff, 5*time.Second, "%s: a failover must not wait out the default 30s back-off", where)
}

// TestNATSStream checks the example stream against docs/DEPLOYMENT.md:
// replicated, on disk, a duplicate window longer than the publisher's
// retry horizon with a minute to spare for a database failover, and a
// full stream that refuses rather than drops unread messages.
func TestNATSStream(t *testing.T) {
	t.Parallel()
	var cfg jetstream.StreamConfig
	dec := json.NewDecoder(bytes.NewReader(readFile(t, "deploy/nats/outbox-stream.json")))
	dec.DisallowUnknownFields()
	require.NoError(t, dec.Decode(&cfg))
	require.NotEmpty(t, cfg.Name)
	require.NotEmpty(t, cfg.Subjects)
	require.Equal(t, 3, cfg.Replicas, "replicas")
	require.Equal(t, jetstream.FileStorage, cfg.Storage)
	require.Equal(t, jetstream.LimitsPolicy, cfg.Retention)
	horizon := poller.Config{}.RetryHorizon()
	require.GreaterOrEqual(t, cfg.Duplicates, horizon+time.Minute, "duplicate window over the default retry horizon (%s) plus a failover", horizon)
	require.Positive(t, cfg.MaxAge, "max_age bounds what --processed-retention must keep")
	if cfg.MaxBytes > 0 || cfg.MaxMsgs > 0 {
		require.Equal(t, jetstream.DiscardNew, cfg.Discard, "a full stream refuses new messages; the publisher waits")
	}
}

func TestKubernetesDeployment(t *testing.T) {
	t.Parallel()
	type probe struct {
		HTTPGet struct {
			Path string `yaml:"path"`
			Port string `yaml:"port"`
		} `yaml:"httpGet"`
	}
	type container struct {
		Name    string   `yaml:"name"`
		Image   string   `yaml:"image"`
		Args    []string `yaml:"args"`
		EnvFrom []struct {
			SecretRef struct {
				Name string `yaml:"name"`
			} `yaml:"secretRef"`
		} `yaml:"envFrom"`
		Env []struct {
			Name  string `yaml:"name"`
			Value string `yaml:"value"`
		} `yaml:"env"`
		Ports []struct {
			Name          string `yaml:"name"`
			ContainerPort int    `yaml:"containerPort"`
		} `yaml:"ports"`
		LivenessProbe  *probe `yaml:"livenessProbe"`
		ReadinessProbe *probe `yaml:"readinessProbe"`
	}
	type object struct {
		APIVersion string `yaml:"apiVersion"`
		Kind       string `yaml:"kind"`
		Metadata   struct {
			Name string `yaml:"name"`
		} `yaml:"metadata"`
		StringData map[string]string `yaml:"stringData"`
		Spec       struct {
			Replicas     int `yaml:"replicas"`
			MinAvailable int `yaml:"minAvailable"`
			Selector     struct {
				MatchLabels map[string]string `yaml:"matchLabels"`
			} `yaml:"selector"`
			Template struct {
				Metadata struct {
					Labels      map[string]string `yaml:"labels"`
					Annotations map[string]string `yaml:"annotations"`
				} `yaml:"metadata"`
				Spec struct {
					TerminationGracePeriodSeconds int `yaml:"terminationGracePeriodSeconds"`
					TopologySpreadConstraints     []struct {
						TopologyKey string `yaml:"topologyKey"`
					} `yaml:"topologySpreadConstraints"`
					Containers []container `yaml:"containers"`
				} `yaml:"spec"`
			} `yaml:"template"`
		} `yaml:"spec"`
	}
	objects := map[string]object{}
	dec := yaml.NewDecoder(bytes.NewReader(readFile(t, "deploy/kubernetes/publisher.yaml")))
	for {
		var o object
		err := dec.Decode(&o)
		if errors.Is(err, io.EOF) {
			break
		}
		require.NoError(t, err)
		require.NotEmpty(t, o.APIVersion)
		objects[o.Kind] = o
	}
	dep, ok := objects["Deployment"]
	require.True(t, ok, "a Deployment")
	require.Equal(t, "apps/v1", dep.APIVersion)
	require.GreaterOrEqual(t, dep.Spec.Replicas, 2, "a leader and a standby")
	pod := dep.Spec.Template
	require.Greater(t, pod.Spec.TerminationGracePeriodSeconds, 15, "longer than the default --ack-timeout plus 10s")
	require.Len(t, pod.Spec.Containers, 1)
	c := pod.Spec.Containers[0]

	set := requireRunArgs(t, c.Args)
	_, port, err := net.SplitHostPort(set["http-addr"])
	require.NoError(t, err, "serves metrics and probes")
	require.Len(t, c.Ports, 1)
	require.Equal(t, port, strconv.Itoa(c.Ports[0].ContainerPort), "container port is --http-addr's")
	require.Equal(t, port, pod.Metadata.Annotations["prometheus.io/port"])
	require.Equal(t, pathMetrics, pod.Metadata.Annotations["prometheus.io/path"])

	require.NotNil(t, c.LivenessProbe)
	require.Equal(t, pathHealthz, c.LivenessProbe.HTTPGet.Path)
	require.Equal(t, c.Ports[0].Name, c.LivenessProbe.HTTPGet.Port)
	require.NotNil(t, c.ReadinessProbe)
	require.Equal(t, pathReadyz, c.ReadinessProbe.HTTPGet.Path)
	require.Equal(t, c.Ports[0].Name, c.ReadinessProbe.HTTPGet.Port)

	known := runEnvVars(t)
	for _, e := range c.Env {
		if e.Name == "GOMEMLIMIT" {
			continue // read by the Go runtime
		}
		require.True(t, known[e.Name], "env %s is not a variable publisher run reads", e.Name)
	}
	secret, ok := objects["Secret"]
	require.True(t, ok, "the Secret the Deployment reads")
	require.Len(t, c.EnvFrom, 1)
	require.Equal(t, secret.Metadata.Name, c.EnvFrom[0].SecretRef.Name)
	env := map[string]string{}
	for k, v := range secret.StringData {
		require.True(t, known[k], "secret key %s is not a variable publisher run reads", k)
		env[k] = v
	}
	for _, e := range c.Env {
		env[e.Name] = e.Value
	}
	requireHAConnections(t, "publisher.yaml", env)

	// Leader and standby apart, and one kept through voluntary disruptions.
	var keys []string
	for _, c := range pod.Spec.TopologySpreadConstraints {
		keys = append(keys, c.TopologyKey)
	}
	require.Contains(t, keys, "topology.kubernetes.io/zone", "replicas spread over zones")
	pdb, ok := objects["PodDisruptionBudget"]
	require.True(t, ok, "a PodDisruptionBudget")
	require.Equal(t, 1, pdb.Spec.MinAvailable)
	require.NotEmpty(t, pdb.Spec.Selector.MatchLabels)
	for k, v := range pdb.Spec.Selector.MatchLabels {
		require.Equal(t, v, pod.Metadata.Labels[k], "the budget selects the Deployment's pods")
	}
}
