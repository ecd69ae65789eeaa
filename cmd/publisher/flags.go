package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"strings"
	"time"
)

// usageError makes main exit with status 2.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usagef(format string, args ...any) error {
	return usageError{fmt.Errorf(format, args...)}
}

// command is one subcommand's flag set. Every flag can also be set from an
// environment variable, OUTBOX_<NAME> with dashes as underscores, and a few
// from conventional names (DATABASE_URL, NATS_URL).
type command struct {
	name, summary, usage string
	fs                   *flag.FlagSet
	env                  map[string][]string // flag name -> env vars, in precedence order
}

func newCommand(name, summary, usage string) *command {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return &command{name: name, summary: summary, usage: usage, fs: fs, env: map[string][]string{}}
}

func envName(flagName string) string {
	return "OUTBOX_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

func (c *command) bind(name string, extraEnv ...string) {
	c.env[name] = append([]string{envName(name)}, extraEnv...)
}

func (c *command) String(p *string, name, def, help string, extraEnv ...string) {
	c.fs.StringVar(p, name, def, help)
	c.bind(name, extraEnv...)
}

func (c *command) Int(p *int, name string, def int, help string) {
	c.fs.IntVar(p, name, def, help)
	c.bind(name)
}

func (c *command) Bool(p *bool, name string, def bool, help string) {
	c.fs.BoolVar(p, name, def, help)
	c.bind(name)
}

func (c *command) Duration(p *time.Duration, name string, def time.Duration, help string) {
	c.fs.DurationVar(p, name, def, help)
	c.bind(name)
}

// errHelp is returned after -h/--help printed the usage: exit 0.
var errHelp = errors.New("help requested")

// parse reads args, then fills each flag not given on the command line from
// its environment variables. -h prints the help to stdout.
func (c *command) parse(args []string, stdout io.Writer) error {
	if err := c.fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			c.printHelp(stdout)
			return errHelp
		}
		return usagef("%s: %v (see 'publisher %s --help')", c.name, err, c.name)
	}
	if c.fs.NArg() > 0 {
		return usagef("%s: unexpected argument %q (see 'publisher %s --help')", c.name, c.fs.Arg(0), c.name)
	}
	set := map[string]bool{}
	c.fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var err error
	c.fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] || err != nil {
			return
		}
		for _, env := range c.env[f.Name] {
			v, ok := os.LookupEnv(env)
			if !ok || v == "" {
				continue
			}
			if e := c.fs.Set(f.Name, v); e != nil {
				err = usagef("%s: environment variable %s=%q: %v", c.name, env, v, e)
			}
			return
		}
	})
	return err
}

func (c *command) printHelp(w io.Writer) {
	fmt.Fprintf(w, "Usage: publisher %s [flags]\n\n%s\n\nFlags:\n", c.name, strings.TrimSpace(c.usage))
	c.fs.VisitAll(func(f *flag.Flag) {
		typ, help := flag.UnquoteUsage(f)
		fmt.Fprintf(w, "  --%s", f.Name)
		if typ != "" {
			fmt.Fprintf(w, " %s", typ)
		}
		fmt.Fprintf(w, "\n        %s\n", help)
		var notes []string
		if f.DefValue != "" && f.DefValue != "false" && f.DefValue != "0" {
			notes = append(notes, "default "+f.DefValue)
		}
		notes = append(notes, "env "+strings.Join(c.env[f.Name], ", "))
		fmt.Fprintf(w, "        (%s)\n", strings.Join(notes, "; "))
	})
}

// byteSize is a flag value in bytes: a whole number, with an optional unit
// KiB, MiB or GiB (32MiB is 33554432). It must be positive.
type byteSize int

var sizeUnits = []struct {
	name  string
	bytes int
}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}}

func (s *byteSize) String() string {
	for _, u := range sizeUnits {
		if *s != 0 && int(*s)%u.bytes == 0 {
			return strconv.Itoa(int(*s)/u.bytes) + u.name
		}
	}
	return strconv.Itoa(int(*s))
}

func (s *byteSize) Set(v string) error {
	num, mult := v, 1
	for _, u := range sizeUnits {
		if n, ok := strings.CutSuffix(v, u.name); ok {
			num, mult = n, u.bytes
			break
		}
	}
	n, err := strconv.Atoi(strings.TrimSpace(num))
	if err != nil || n <= 0 || n > math.MaxInt/mult {
		return fmt.Errorf("%q is not a positive size: give bytes, or a number with KiB, MiB or GiB", v)
	}
	*s = byteSize(n * mult)
	return nil
}

// Bytes defines a size flag; help names its type with `size` in backquotes.
func (c *command) Bytes(p *int, name string, def int, help string) {
	*p = def
	c.fs.Var((*byteSize)(p), name, help)
	c.bind(name)
}
