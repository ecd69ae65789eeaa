# Two commands do everything: `make demo` runs the saga end to end,
# `make test` runs every test (first `make deps`: system packages the tests
# need). Both use the local PostgreSQL and NATS (DATABASE_URL and NATS_URL
# override them).
GO ?= go

.PHONY: demo test deps build bench bench-watermill faults vet fmt

demo:
	$(GO) run ./examples/order-service

test: deps
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 12m ./...

# System packages the tests need, installed where missing (apt-get):
# chromium for the console's browser tests, pgbouncer for the pooler
# tests. Instant when present; CI runs it through `make test`.
deps:
	./.ci/deps

build:
	$(GO) build -o bin/publisher ./cmd/publisher

bench:
	$(GO) test -run '^$$' -bench . -benchmem ./pkg/...

# Watermill's SQL-to-JetStream forwarder on the drain workload of
# `publisher bench`, for the same-run comparison (bench/watermill/README.md).
# A module of its own, so the project never depends on Watermill; not part
# of `make test`. Pass flags with WATERMILL_ARGS='--events 10000'.
bench-watermill:
	cd bench/watermill && $(GO) run . $(WATERMILL_ARGS)

# The fault-injection suite (docs/RELIABILITY.md): the real publisher binary
# under SIGKILL, SIGTERM, terminated backends, broker outages and more.
faults:
	$(GO) test -tags faults -run TestFaults -count=1 -timeout 60m -v ./integration/

fmt:
	gofmt -w $$(git ls-files '*.go')
