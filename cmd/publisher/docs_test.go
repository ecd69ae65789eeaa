package main

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/pkg/dedup"
)

// flagDoc is what the configuration reference says of one flag, and what
// the flag set says of it.
type flagDoc struct {
	def string   // default as flag.Flag.DefValue
	env []string // environment variables, in precedence order
}

var (
	helpFlag    = regexp.MustCompile(`^  --([a-z0-9-]+)(?: (\S+))?$`)
	helpNotes   = regexp.MustCompile(`^        \((?:default (.*); )?env (.*)\)$`)
	docSection  = regexp.MustCompile("^## `publisher ([a-z]+)`")
	docFlagRow  = regexp.MustCompile("^\\| `--([a-z0-9-]+)` \\| ([^|]*) \\| ([^|]*) \\|")
	docEnvName  = regexp.MustCompile("`([A-Z0-9_]+)`")
	docDefault  = regexp.MustCompile("^`(.*)`$")
	metricRow   = regexp.MustCompile("^\\| `([a-z_]+)`")
	metricInDoc = regexp.MustCompile(`\b(outbox_[a-z_]+)\b`)
)

// helpFlags runs `publisher <name> --help` and reads each flag's default
// and environment variables from it: the real flag set, as users see it.
// The help leaves out defaults that are the zero value of the flag's type;
// they are put back from the type it shows.
func helpFlags(t *testing.T, name string) map[string]flagDoc {
	t.Helper()
	var out bytes.Buffer
	err := run(context.Background(), []string{name, "--help"}, &out, &out)
	require.ErrorIs(t, err, errHelp)
	flags := map[string]flagDoc{}
	var (
		cur string
		typ string
	)
	sc := bufio.NewScanner(&out)
	for sc.Scan() {
		line := sc.Text()
		if m := helpFlag.FindStringSubmatch(line); m != nil {
			cur, typ = m[1], m[2]
			continue
		}
		m := helpNotes.FindStringSubmatch(line)
		if m == nil || cur == "" {
			continue
		}
		def := m[1]
		if def == "" {
			def = map[string]string{"": "false", "int": "0", "string": ""}[typ]
		}
		flags[cur] = flagDoc{def: def, env: strings.Split(m[2], ", ")}
		cur = ""
	}
	return flags
}

// docFlags reads docs/CONFIGURATION.md: a "## `publisher NAME`" section per
// command, each with a table of | `--flag` | `ENV`, ... | `default` or — |.
func docFlags(t *testing.T) map[string]map[string]flagDoc {
	t.Helper()
	f, err := os.Open("../../docs/CONFIGURATION.md")
	require.NoError(t, err)
	defer f.Close()
	docs := map[string]map[string]flagDoc{}
	var cmd string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if m := docSection.FindStringSubmatch(line); m != nil {
			cmd = m[1]
			docs[cmd] = map[string]flagDoc{}
			continue
		}
		if strings.HasPrefix(line, "## ") {
			cmd = ""
		}
		m := docFlagRow.FindStringSubmatch(line)
		if m == nil || cmd == "" {
			continue
		}
		d := flagDoc{}
		for _, e := range docEnvName.FindAllStringSubmatch(m[2], -1) {
			d.env = append(d.env, e[1])
		}
		if dm := docDefault.FindStringSubmatch(strings.TrimSpace(m[3])); dm != nil {
			d.def = dm[1]
		} else {
			require.Equal(t, "—", strings.TrimSpace(m[3]), "%s --%s: default is `value` or — (empty)", cmd, m[1])
		}
		_, dup := docs[cmd][m[1]]
		require.False(t, dup, "%s --%s documented twice", cmd, m[1])
		docs[cmd][m[1]] = d
	}
	require.NoError(t, sc.Err())
	return docs
}

// docRow is the table row the reference needs for a flag.
func docRow(name string, f flagDoc) string {
	env := make([]string, len(f.env))
	for i, e := range f.env {
		env[i] = "`" + e + "`"
	}
	def := "—"
	if f.def != "" {
		def = "`" + f.def + "`"
	}
	return "| `--" + name + "` | " + strings.Join(env, ", ") + " | " + def + " | … |"
}

// TestConfigurationReferenceMatchesFlags keeps docs/CONFIGURATION.md and
// the flag sets from drifting apart: every flag of every command, its
// environment variables and its default.
func TestConfigurationReferenceMatchesFlags(t *testing.T) {
	t.Parallel()
	docs := docFlags(t)
	for _, cmd := range order {
		t.Run(cmd, func(t *testing.T) {
			doc, ok := docs[cmd]
			require.True(t, ok, "docs/CONFIGURATION.md has no section \"## `publisher %s`\"", cmd)
			real := helpFlags(t, cmd)
			for name, f := range real {
				d, ok := doc[name]
				require.True(t, ok, "docs/CONFIGURATION.md, publisher %s: --%s is missing; add\n%s", cmd, name, docRow(name, f))
				require.Equal(t, docRow(name, f), docRow(name, d), "docs/CONFIGURATION.md, publisher %s --%s", cmd, name)
			}
			for name := range doc {
				_, ok := real[name]
				require.True(t, ok, "docs/CONFIGURATION.md, publisher %s: --%s is documented but does not exist", cmd, name)
			}
		})
	}
	for cmd := range docs {
		require.Contains(t, order, cmd, "docs/CONFIGURATION.md documents an unknown command %q", cmd)
	}
}

// TestMetricsReferenceMatchesMetrics checks that docs/OBSERVABILITY.md
// lists every metric, and only metrics that exist.
func TestMetricsReferenceMatchesMetrics(t *testing.T) {
	t.Parallel()
	body, err := os.ReadFile("../../docs/OBSERVABILITY.md")
	require.NoError(t, err)
	var documented []string
	for _, line := range strings.Split(string(body), "\n") {
		if m := metricRow.FindStringSubmatch(line); m != nil && strings.HasPrefix(m[1], "outbox_") {
			documented = append(documented, m[1])
		}
	}
	require.ElementsMatch(t, metricNames(), documented, "metric tables of docs/OBSERVABILITY.md")
	for _, m := range metricInDoc.FindAllString(string(body), -1) {
		require.True(t, knownSeries(m), "docs/OBSERVABILITY.md mentions %s, which does not exist", m)
	}
}

// metricNames returns the name of every metric the project defines, from
// the collectors' descriptions (vectors without children included).
func metricNames() []string {
	ch := make(chan *prometheus.Desc, 64)
	go func() {
		poller.NewMetrics().Describe(ch)
		dedup.NewMetrics().Describe(ch)
		close(ch)
	}()
	descName := regexp.MustCompile(`fqName: "([^"]+)"`)
	var names []string
	for d := range ch {
		names = append(names, descName.FindStringSubmatch(d.String())[1])
	}
	slices.Sort(names)
	return names
}

// knownSeries reports whether name is a metric or one of a histogram's
// series (_bucket, _sum, _count).
func knownSeries(name string) bool {
	for _, m := range metricNames() {
		if name == m || name == m+"_bucket" || name == m+"_sum" || name == m+"_count" {
			return true
		}
	}
	return false
}
