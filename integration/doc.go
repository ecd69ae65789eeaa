// Package integration tests the publisher binary end to end against a real
// PostgreSQL and a real NATS JetStream server: it builds cmd/publisher once,
// runs it as a child process (several at once, killed with SIGKILL,
// stopped with SIGTERM), writes events with pkg/outbox, consumes them with
// pkg/dedup and asserts on what a user sees: rows in the events table,
// messages in the stream, rows written by the consumer, and the binary's
// output and exit codes.
//
// DATABASE_URL and NATS_URL override the local servers (see
// internal/testenv). Every test owns its schema and its streams, so the
// tests run in parallel.
package integration
