// Package wire is the one rule of publishability shared by the writer
// (pkg/outbox) and the publisher (internal/poller): it builds the exact NATS
// message of an event and reports why the NATS client, the NATS server or
// PostgreSQL would refuse it.
//
// The writer applies the rule before any SQL, with the fields the publisher
// fills in later (event id, seq, creation time) at their longest (see
// Worst); the publisher applies it again to every claimed row before
// sending, so a row that reached the table some other way is FAILED with
// the reason instead of being refused by the client or the server.
//
// The limits are those of nats.go v1.55 and nats-server v2 with default
// settings:
//
//   - a header name is printable ASCII (33-126) except "()/,:;<=>?@[\]{}
//     (nats.go refuses the message with ErrBadHeaderMsg);
//   - the HPUB protocol line "<subject> <reply> <header bytes> <total
//     bytes>" is at most the server's max_control_line (DefaultMaxControlLine
//     unless configured): a longer one makes the server close the connection
//     ("maximum control line exceeded"), and nats.go does not reconnect
//     after that. The server's INFO does not announce this limit, so it is a
//     parameter of Build that the writer and the publisher are configured
//     with;
//   - the header block, as the client encodes it, is at most MaxHeaderBytes
//     (JetStream refuses more);
//   - header block plus payload is at most the server's max_payload
//     (nats.go refuses more with ErrMaxPayload, the server closes the
//     connection).
//
// On top, the outbox's own rules: subjects are literal (no wildcards, no
// empty token, no whitespace or control characters), every text is valid
// UTF-8 without NUL (PostgreSQL's text refuses NUL), header values
// (EntityType, EntityID and Type travel as header values too) hold no CR or
// LF (the client would turn them into spaces) and neither start nor end with
// a space or a tab (the client trims them, so the consumer would read
// another value), no header name or value holds "Nats-Msg-Id" (older
// nats-servers, 2.9 among them, look the message id up as the first
// occurrence of that text in the header block, miss it and store a resent
// event twice), the names the publisher sets are reserved, and EntityType,
// EntityID and Type are bounded so that no index on them can refuse the
// row.
package wire

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Headers the publisher sets on every message.
const (
	HeaderMsgID      = jetstream.MsgIDHeader
	HeaderEventID    = "Outbox-Event-Id"
	HeaderEventType  = "Outbox-Event-Type"
	HeaderEntityType = "Outbox-Entity-Type"
	HeaderEntityID   = "Outbox-Entity-Id"
	HeaderSeq        = "Outbox-Seq"
	HeaderCreatedAt  = "Outbox-Created-At"
	HeaderReplay     = "Outbox-Replay"
)

// Limits of the rule, in bytes.
const (
	// DefaultMaxControlLine is nats-server's default max_control_line,
	// which bounds the arguments of a PUB or HPUB line. A server may be
	// configured with another; its INFO does not say.
	DefaultMaxControlLine = 4096
	// ReplyBudget is the room left in the control line for the reply
	// subject of a JetStream publish; nats.go's is "_INBOX.<6>.<6>", 20
	// bytes.
	ReplyBudget = 64
	// MaxHeaderBytes is the largest header block JetStream stores.
	MaxHeaderBytes = math.MaxUint16
	// DefaultMaxPayload is nats-server's default max_payload, which counts
	// the header block and the payload.
	DefaultMaxPayload = 1 << 20
	// MaxEntityType, MaxEntityID and MaxType bound those fields: entity
	// type and id are indexed together with seq, and a btree entry holds at
	// most 2704 bytes.
	MaxEntityType = 255
	MaxEntityID   = 1024
	MaxType       = 255
)

// Event is what an event's NATS message is made of.
type Event struct {
	ID         string // the event id, also the Nats-Msg-Id
	Seq        int64
	Subject    string // empty: EntityType + "." + Type
	Type       string
	EntityType string
	EntityID   string
	Data       []byte
	Headers    map[string]string // the user's headers
	CreatedAt  time.Time
	// Replay, when set, is the run id of a replay: Nats-Msg-Id is then
	// ReplayMsgID(ID, Replay) and the Outbox-Replay header is set to it.
	Replay string
}

// ReplayRunIDLen is the length of the run ids `publisher replay` uses (a
// UUID), for which Worst reserves room: every event Write accepts can also
// be replayed.
const ReplayRunIDLen = 36

// ReplayMsgID is the Nats-Msg-Id of an event sent again by a replay: the
// event id and the run id, so that JetStream does not drop the replayed
// copy as a duplicate of the original, while the same run sent twice is
// deduplicated.
func ReplayMsgID(eventID, runID string) string { return eventID + ":replay:" + runID }

// Worst returns ev with the fields the publisher fills in (ID, Seq,
// CreatedAt) at their longest, and as a replay would send it (with a run id
// of ReplayRunIDLen bytes), so that the message of every row ev can become
// is no larger than Build's of it.
func Worst(ev Event) Event {
	ev.ID = "00000000-0000-0000-0000-000000000000"
	ev.Replay = strings.Repeat("0", ReplayRunIDLen)
	ev.Seq = math.MaxInt64
	ev.CreatedAt = time.Date(9999, 12, 31, 23, 59, 59, 999999999, time.UTC)
	return ev
}

// Error says which field of an event breaks the rule, and why.
type Error struct {
	Field  string // "EntityType", "Subject", "Headers", "Data", ...
	Reason string
}

func (e *Error) Error() string { return e.Field + ": " + e.Reason }

// Build returns the NATS message of ev and its size as the client sends it
// (header block plus payload), or an *Error saying why the client, the
// server (whose max_payload is maxPayload, 0 meaning DefaultMaxPayload, and
// whose max_control_line is maxControlLine, 0 meaning
// DefaultMaxControlLine) or the outbox's own rules refuse it.
func Build(ev Event, maxPayload, maxControlLine int) (*nats.Msg, int, error) {
	if maxPayload <= 0 {
		maxPayload = DefaultMaxPayload
	}
	if maxControlLine <= 0 {
		maxControlLine = DefaultMaxControlLine
	}
	bad := func(field, reason string, args ...any) (*nats.Msg, int, error) {
		return nil, 0, &Error{Field: field, Reason: fmt.Sprintf(reason, args...)}
	}
	for _, f := range []struct {
		name, value string
		max         int
	}{
		{"EntityType", ev.EntityType, MaxEntityType},
		{"EntityID", ev.EntityID, MaxEntityID},
		{"Type", ev.Type, MaxType},
	} {
		switch {
		case f.value == "":
			return bad(f.name, "required")
		case len(f.value) > f.max:
			return bad(f.name, "%d bytes, over the maximum of %d", len(f.value), f.max)
		case !validValue(f.value):
			return bad(f.name, "%s", valueRule)
		case strings.Contains(f.value, msgIDText):
			return bad(f.name, "%s", msgIDRule)
		}
	}
	subject := ev.Subject
	if subject == "" {
		subject = ev.EntityType + "." + ev.Type
	}
	if err := CheckSubject(subject); err != nil {
		field := "Subject"
		if ev.Subject == "" {
			field = "Subject (from EntityType.Type)"
		}
		return bad(field, "%q: %v", short(subject), err)
	}
	m := nats.NewMsg(subject)
	m.Data = ev.Data
	for k, v := range ev.Headers {
		switch {
		case !ValidHeaderName(k):
			return bad("Headers", "name %q: must be printable ASCII without spaces or any of %s (the NATS client refuses it)", short(k), badNameChars)
		case reserved(k):
			return bad("Headers", "name %q is set by the publisher", short(k))
		case strings.Contains(k, msgIDText):
			return bad("Headers", "name %q %s", short(k), msgIDRule)
		case !validValue(v):
			return bad("Headers", "value of %q: %s", short(k), valueRule)
		case strings.Contains(v, msgIDText):
			return bad("Headers", "value of %q: %s", short(k), msgIDRule)
		}
		m.Header.Set(k, v)
	}
	m.Header.Set(HeaderMsgID, ev.ID)
	if ev.Replay != "" {
		if !validValue(ev.Replay) || strings.Contains(ev.Replay, msgIDText) {
			return bad("Replay", "run id %q: %s", short(ev.Replay), valueRule)
		}
		m.Header.Set(HeaderMsgID, ReplayMsgID(ev.ID, ev.Replay))
		m.Header.Set(HeaderReplay, ev.Replay)
	}
	m.Header.Set(HeaderEventID, ev.ID)
	m.Header.Set(HeaderEventType, ev.Type)
	m.Header.Set(HeaderEntityType, ev.EntityType)
	m.Header.Set(HeaderEntityID, ev.EntityID)
	m.Header.Set(HeaderSeq, strconv.FormatInt(ev.Seq, 10))
	m.Header.Set(HeaderCreatedAt, ev.CreatedAt.UTC().Format(time.RFC3339Nano))

	hdr := HeaderSize(m.Header)
	if hdr > MaxHeaderBytes {
		return bad("Headers", "the header block is %d bytes with the publisher's headers, over JetStream's maximum of %d", hdr, MaxHeaderBytes)
	}
	total := hdr + len(m.Data)
	if total > maxPayload {
		return bad("Data", "the message is %d bytes (payload %d, headers %d with the publisher's), over the maximum of %d",
			total, len(m.Data), hdr, maxPayload)
	}
	if line := ControlLine(len(subject), hdr, total); line > maxControlLine {
		return bad("Subject", "%d bytes: the protocol line would be %d bytes, over the server's max_control_line of %d",
			len(subject), line, maxControlLine)
	}
	return m, total, nil
}

// ControlLine is the length of the arguments of the HPUB line that sends a
// message with a subject of subjectLen bytes, hdr header bytes and total
// bytes in all, with a reply subject of ReplyBudget bytes.
func ControlLine(subjectLen, hdr, total int) int {
	return subjectLen + 1 + ReplyBudget + 1 + digits(hdr) + 1 + digits(total)
}

func digits(n int) int { return len(strconv.Itoa(n)) }

// HeaderSize is the size of h's header block as nats.go encodes it:
// "NATS/1.0\r\n", "name: value\r\n" for each value (trimmed of surrounding
// ASCII whitespace) and a final "\r\n".
func HeaderSize(h nats.Header) int {
	if len(h) == 0 {
		return 0
	}
	n := len("NATS/1.0\r\n") + len("\r\n")
	for k, vs := range h {
		for _, v := range vs {
			n += len(k) + len(": ") + len(strings.Trim(v, " \t\r\n")) + len("\r\n")
		}
	}
	return n
}

// badNameChars are the printable ASCII characters nats.go refuses in a
// header name.
const badNameChars = `"()/,:;<=>?@[\]{}`

// ValidHeaderName reports whether nats.go accepts k as a header name.
func ValidHeaderName(k string) bool {
	if k == "" {
		return false
	}
	for i := 0; i < len(k); i++ {
		if c := k[i]; c < 33 || c > 126 || strings.IndexByte(badNameChars, c) >= 0 {
			return false
		}
	}
	return true
}

// CheckSubject reports why s cannot be a subject the outbox publishes to,
// or nil: tokens are separated by dots, none may be empty, and none may hold
// whitespace, control characters or the wildcards '*' and '>'. Its length
// is bounded by Build, through the protocol line.
func CheckSubject(s string) error {
	if s == "" {
		return errors.New("must not be empty")
	}
	if !utf8.ValidString(s) {
		return errors.New("must be valid UTF-8")
	}
	for i, tok := range strings.Split(s, ".") {
		if tok == "" {
			return fmt.Errorf("token %d is empty (leading, trailing or double dot)", i+1)
		}
		if strings.ContainsAny(tok, "*>") {
			return fmt.Errorf("token %q holds a wildcard ('*' or '>')", short(tok))
		}
		if strings.IndexFunc(tok, func(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) }) >= 0 {
			return fmt.Errorf("token %q holds whitespace or a control character", short(tok))
		}
	}
	return nil
}

// validValue reports whether v can be stored as PostgreSQL text and travel
// unchanged as a NATS header value: nats.go trims leading and trailing
// spaces and tabs, and turns CR and LF into spaces.
func validValue(v string) bool {
	return utf8.ValidString(v) && !strings.ContainsAny(v, "\r\n\x00") && strings.Trim(v, " \t") == v
}

const valueRule = "must be valid UTF-8 without CR, LF or NUL, and neither start nor end with a space or a tab (the NATS client trims them)"

// msgIDText is the header name nats-server looks the message id up by.
// Servers before the fix look it up as the first occurrence of the text in
// the header block, and find none when a header sent before it holds the
// text.
const msgIDText = HeaderMsgID

const msgIDRule = `must not hold "` + msgIDText + `": older nats-servers (2.9 among them) then miss the message id and store an event sent again twice`

// reserved reports whether k is a name the publisher or NATS owns: "Nats-"
// and "Outbox-" names, in any case.
func reserved(k string) bool {
	k = strings.ToLower(k)
	return strings.HasPrefix(k, "nats-") || strings.HasPrefix(k, "outbox-")
}

// short cuts s for an error message.
func short(s string) string {
	if len(s) <= 64 {
		return s
	}
	i := 61
	for i > 0 && !utf8.RuneStart(s[i]) {
		i--
	}
	return s[:i] + "..."
}
