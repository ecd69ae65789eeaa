package outbox

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"mime"
	"strings"
	"unicode/utf8"
)

// HeaderContentType carries an event's content type (Event.ContentType) to
// consumers. Events without one are JSON and carry no such header.
const HeaderContentType = "Content-Type"

// Payloads are stored as bytea and published byte for byte as written: a
// consumer receives exactly Data. JSON payloads are checked to be valid
// JSON; payloads of any other content type (protobuf, Avro, ...) are opaque.

// withContentType returns ev with its content type settled: ContentType,
// or else a Content-Type header (any case) the caller set; and that header
// set to it. It refuses the two when they disagree, and two Content-Type
// headers differing only in case (which one counted would depend on map
// order, and consumers would receive both). ev.Headers itself is never
// modified.
func withContentType(i int, ev Event) (Event, error) {
	key, fromHeader := "", ""
	for k, v := range ev.Headers {
		if !strings.EqualFold(k, HeaderContentType) {
			continue
		}
		if key != "" {
			a, b := min(key, k), max(key, k)
			return ev, &ValidationError{Index: i, Field: "Headers",
				Reason: fmt.Sprintf("two content type headers, %q and %q: keep one", a, b)}
		}
		key, fromHeader = k, v
	}
	switch {
	case ev.ContentType == "":
		ev.ContentType = fromHeader
		return ev, nil
	case key != "" && fromHeader != ev.ContentType:
		return ev, &ValidationError{Index: i, Field: "ContentType",
			Reason: fmt.Sprintf("%q disagrees with the %s header %q", ev.ContentType, key, fromHeader)}
	case key != "":
		return ev, nil
	}
	h := make(map[string]string, len(ev.Headers)+1)
	maps.Copy(h, ev.Headers)
	h[HeaderContentType] = ev.ContentType
	ev.Headers = h
	return ev, nil
}

// isJSON reports whether contentType is JSON: empty (the default),
// application/json, or a structured "+json" type such as
// application/cloudevents+json, parameters aside.
func isJSON(contentType string) bool {
	if contentType == "" {
		return true
	}
	mt, _, err := mime.ParseMediaType(contentType)
	if err != nil {
		return false
	}
	return mt == "application/json" || strings.HasSuffix(mt, "+json")
}

// encodeData returns the bytes to store for payload v of the given content
// type. JSON payloads: json.RawMessage and []byte must be valid JSON and are
// kept byte for byte; any other value is marshalled with encoding/json.
// Other content types take []byte (or json.RawMessage) as they are.
func encodeData(v any, contentType string) ([]byte, error) {
	if v == nil {
		return nil, errors.New("required (use json.RawMessage(\"null\") for an empty JSON payload)")
	}
	if !isJSON(contentType) {
		switch d := v.(type) {
		case []byte:
			return d, nil
		case json.RawMessage:
			return d, nil
		default:
			return nil, fmt.Errorf("must be []byte for content type %q, got %T", contentType, v)
		}
	}
	var raw []byte
	switch d := v.(type) {
	case json.RawMessage:
		raw = d
	case []byte:
		raw = d
	default:
		b, err := json.Marshal(v)
		if err != nil {
			return nil, fmt.Errorf("marshal to JSON: %w", err)
		}
		raw = b
	}
	if !json.Valid(raw) {
		return nil, errors.New("not valid JSON")
	}
	// encoding/json accepts invalid UTF-8 in strings, but JSON text is
	// UTF-8 (RFC 8259), and a consumer decoding it would silently get
	// U+FFFD instead of the bytes written.
	if !utf8.Valid(raw) {
		return nil, errors.New("not valid UTF-8")
	}
	return raw, nil
}
