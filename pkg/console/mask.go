package console

import (
	"bytes"
	"encoding/json"
)

// maskedValue replaces a masked JSON value.
const maskedValue = "***"

// mask decodes the JSON document data, replaces the values at h's mask
// paths with maskedValue, and returns the document and how many values it
// replaced. Numbers keep their spelling.
func (h *Handler) mask(data []byte) (any, int) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	var doc any
	if err := dec.Decode(&doc); err != nil {
		return json.RawMessage(data), 0
	}
	n := 0
	for _, p := range h.masks {
		doc = maskPath(doc, p, &n)
	}
	return doc, n
}

// maskPath replaces the values at path in v; "*" matches every key of an
// object and every element of an array.
func maskPath(v any, path []string, n *int) any {
	if len(path) == 0 {
		*n++
		return maskedValue
	}
	key, rest := path[0], path[1:]
	switch t := v.(type) {
	case map[string]any:
		for k, c := range t {
			if key == "*" || k == key {
				t[k] = maskPath(c, rest, n)
			}
		}
	case []any:
		for i, c := range t {
			if key == "*" || key == itoa(i) {
				t[i] = maskPath(c, rest, n)
			}
		}
	}
	return v
}

func itoa(i int) string {
	b, _ := json.Marshal(i)
	return string(b)
}
