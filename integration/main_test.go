package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// publisherBin is the path of the publisher binary built by TestMain.
var publisherBin string

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	dir, err := os.MkdirTemp("", "outbox-integration-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration: temp dir:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	publisherBin = filepath.Join(dir, "publisher")
	if err := build(publisherBin); err != nil {
		fmt.Fprintln(os.Stderr, "integration:", err)
		return 1
	}
	return m.Run()
}

// build compiles cmd/publisher to bin with the go command on PATH.
func build(bin string) error {
	goBin, err := exec.LookPath("go")
	if err != nil {
		return fmt.Errorf("the go command is needed to build the publisher binary: %w", err)
	}
	cmd := exec.Command(goBin, "build", "-o", bin, "github.com/pgnats/outbox/cmd/publisher")
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go build cmd/publisher: %w", err)
	}
	return nil
}
