package outbox

// Prepare exposes prepare to the outbox_test package: it validates ev as
// the i-th event of a Write and returns the subject, payload and headers
// Write would insert.
func (w *Writer) Prepare(i int, ev Event) (subject string, data, headers []byte, err error) {
	p, err := w.prepare(i, ev)
	return p.subject, p.data, p.headers, err
}
