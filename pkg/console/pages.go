package console

import (
	"context"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/google/uuid"
	"github.com/lib/pq"

	"github.com/pgnats/outbox/internal/poller"
	"github.com/pgnats/outbox/pkg/outbox"
)

// listLimit bounds the blocked entities and error groups a page lists.
const listLimit = 50

func (h *Handler) overview(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := h.ctx(r)
	defer cancel()
	st, err := poller.ReadStatusWith(ctx, h.cfg.DB, h.cfg.Table, poller.StatusOptions{Limit: 10, EstimateSuccess: true})
	if err != nil {
		h.failErr(w, r, err)
		return
	}
	c, err := h.chart(ctx)
	if err != nil {
		h.failErr(w, r, err)
		return
	}
	oldest := "-"
	if st.OldestReadyAge != nil {
		oldest = duration(*st.OldestReadyAge)
	}
	h.render(w, r, http.StatusOK, "overview", page{Title: "Overview", Nav: "overview",
		Refresh: int(h.cfg.Refresh.Seconds()),
		Data: struct {
			S      *poller.Status
			Oldest string
			Chart  template.HTML
			Sum    chartSum
		}{st, oldest, c.svg(), c.sum()}})
}

// eventRow is an event as lists show it.
type eventRow struct {
	ID, Subject, Type, EntityType, EntityID, Status, LastError string
	Seq                                                        int64
	Attempts                                                   int
	CreatedAt                                                  time.Time
	PublishedAt                                                *time.Time
}

const eventCols = `event_id, seq, event_target, event_type, entity_type, entity_id, event_status, attempts,
	coalesce(last_error, ''), created_at, published_at`

func scanEvent(rows *sql.Rows) (eventRow, error) {
	var e eventRow
	err := rows.Scan(&e.ID, &e.Seq, &e.Subject, &e.Type, &e.EntityType, &e.EntityID, &e.Status,
		&e.Attempts, &e.LastError, &e.CreatedAt, &e.PublishedAt)
	return e, err
}

// collect reads every row of a query with scan, and closes the rows.
func collect[T any](rows *sql.Rows, err error, scan func(*sql.Rows) (T, error)) ([]T, error) {
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []T
	for rows.Next() {
		v, err := scan(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}

// filter is the events a list shows, from the query string.
type filter struct {
	Status, EntityType, EntityID, Type, Subject, Error string
	Since, Until                                       string // as typed
	since, until                                       time.Time
	Before                                             int64 // keyset: seq below this
	// seqFrom and seqTo narrow a time range to a range of seq, so the
	// list reads the seq index only there (0: open).
	seqFrom, seqTo int64
}

// timeLayouts are the time forms filters take: a browser's datetime-local
// (read as UTC) and RFC 3339.
var timeLayouts = []string{"2006-01-02T15:04", "2006-01-02T15:04:05", time.RFC3339, "2006-01-02"}

func parseTime(s string) (time.Time, error) {
	for _, l := range timeLayouts {
		if t, err := time.Parse(l, s); err == nil {
			return t, nil
		}
	}
	return time.Time{}, fmt.Errorf("%q is not a time: use 2006-01-02T15:04 (UTC) or RFC 3339", s)
}

func parseFilter(q url.Values) (filter, error) {
	f := filter{
		Status: strings.ToUpper(strings.TrimSpace(q.Get("status"))), EntityType: strings.TrimSpace(q.Get("entity_type")),
		EntityID: strings.TrimSpace(q.Get("entity_id")), Type: strings.TrimSpace(q.Get("type")),
		Subject: strings.TrimSpace(q.Get("subject")), Error: strings.TrimSpace(q.Get("error")),
		Since: strings.TrimSpace(q.Get("since")), Until: strings.TrimSpace(q.Get("until")),
	}
	switch f.Status {
	case "", "READY", "SUCCESS", "FAILED":
	default:
		return f, fmt.Errorf("status %q: use READY, SUCCESS or FAILED", f.Status)
	}
	var err error
	if f.Since != "" {
		if f.since, err = parseTime(f.Since); err != nil {
			return f, fmt.Errorf("since: %w", err)
		}
	}
	if f.Until != "" {
		if f.until, err = parseTime(f.Until); err != nil {
			return f, fmt.Errorf("until: %w", err)
		}
	}
	if b := q.Get("before"); b != "" {
		if f.Before, err = strconv.ParseInt(b, 10, 64); err != nil || f.Before < 1 {
			return f, fmt.Errorf("before %q: not a seq", b)
		}
	}
	return f, nil
}

// values is f as a query string, without the cursor.
func (f filter) values() url.Values {
	v := url.Values{}
	for k, s := range map[string]string{"status": f.Status, "entity_type": f.EntityType, "entity_id": f.EntityID,
		"type": f.Type, "subject": f.Subject, "error": f.Error, "since": f.Since, "until": f.Until} {
		if s != "" {
			v.Set(k, s)
		}
	}
	return v
}

// where returns f as an SQL condition and its arguments.
func (f filter) where() (string, []any) {
	conds := []string{"true"}
	var args []any
	add := func(cond string, v any) {
		args = append(args, v)
		conds = append(conds, strings.ReplaceAll(cond, "?", "$"+strconv.Itoa(len(args))))
	}
	if f.Status != "" {
		add("event_status = ?", f.Status)
	}
	if f.EntityType != "" {
		add("entity_type = ?", f.EntityType)
	}
	if f.EntityID != "" {
		add("entity_id = ?", f.EntityID)
	}
	if f.Type != "" {
		add("event_type = ?", f.Type)
	}
	if f.Subject != "" {
		add(`event_target LIKE ? ESCAPE '\'`, escapeLike(f.Subject)+"%")
	}
	if f.Error != "" {
		add(`last_error ILIKE ? ESCAPE '\'`, "%"+escapeLike(f.Error)+"%")
	}
	if !f.since.IsZero() {
		add("created_at >= ?", f.since)
	}
	if !f.until.IsZero() {
		add("created_at < ?", f.until)
	}
	if f.Before > 0 {
		add("seq < ?", f.Before)
	}
	if f.seqFrom > 0 {
		add("seq >= ?", f.seqFrom)
	}
	if f.seqTo > 0 {
		add("seq < ?", f.seqTo)
	}
	return strings.Join(conds, " AND "), args
}

func escapeLike(s string) string {
	return strings.NewReplacer(`\`, `\\`, `%`, `\%`, `_`, `\_`).Replace(s)
}

// scanWindow is how many seqs one page of a list reads at most when its
// filter has no index to use (event type, subject or error text over
// SUCCESS events): a filter that matches few events then costs a bounded
// scan per page, and the page offers to search older events.
const scanWindow = 100_000

// listing is a page of events.
type listing struct {
	Events []eventRow
	// Next is the seq the next (older) page starts below; 0 at the end.
	Next int64
	// SearchedFrom is the lowest seq this page searched, when a scan
	// window bounded it and older events may still match; else 0.
	SearchedFrom int64
}

// list reads a page of the events f selects, newest first.
func (h *Handler) list(r *http.Request, f filter) (listing, error) {
	var l listing
	ctx, cancel := h.ctx(r)
	defer cancel()
	if err := h.narrow(ctx, &f); err != nil {
		return l, err
	}
	windowed := (f.Type != "" || f.Subject != "" || f.Error != "") && f.EntityType == "" &&
		(f.Status == "" || f.Status == "SUCCESS")
	var floor int64
	if windowed {
		top := f.Before
		if top == 0 {
			if err := h.cfg.DB.QueryRowContext(ctx, `SELECT coalesce(max(seq), 0) + 1 FROM `+h.table.Quoted()).Scan(&top); err != nil {
				return l, err
			}
		}
		if f.seqTo > 0 {
			top = min(top, f.seqTo)
		}
		floor = max(top-scanWindow, f.seqFrom, 1)
		f.seqFrom = floor
	}
	where, args := f.where()
	args = append(args, h.cfg.PageSize+1)
	rows, err := h.cfg.DB.QueryContext(ctx, `SELECT `+eventCols+` FROM `+h.table.Quoted()+`
		WHERE `+where+` ORDER BY seq DESC LIMIT $`+strconv.Itoa(len(args)), args...)
	if l.Events, err = collect(rows, err, scanEvent); err != nil {
		return l, err
	}
	switch {
	case len(l.Events) > h.cfg.PageSize:
		l.Events = l.Events[:h.cfg.PageSize]
		l.Next = l.Events[len(l.Events)-1].Seq
	case windowed && floor > 1:
		var older bool
		if err := h.cfg.DB.QueryRowContext(ctx, `SELECT EXISTS (SELECT 1 FROM `+h.table.Quoted()+` WHERE seq < $1)`, floor).Scan(&older); err != nil {
			return l, err
		}
		if older {
			l.Next, l.SearchedFrom = floor, floor
		}
	}
	return l, nil
}

// timeMargin is how far outside a time filter the seq range it is
// narrowed to reaches: an event written by a transaction that began more
// than this before the events around it in seq order may be left out of
// a time-filtered list.
const timeMargin = time.Hour

// narrow bounds f's seq by its time range, so that a range matching few
// events does not read the whole seq index: seq and created_at rise
// together (within timeMargin).
func (h *Handler) narrow(ctx context.Context, f *filter) error {
	var err error
	if !f.since.IsZero() {
		if f.seqFrom, err = h.seqAt(ctx, f.since.Add(-timeMargin)); err != nil {
			return err
		}
	}
	if !f.until.IsZero() {
		if f.seqTo, err = h.seqAt(ctx, f.until.Add(timeMargin)); err != nil {
			return err
		}
	}
	return nil
}

func (h *Handler) events(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	if id := strings.TrimSpace(q.Get("id")); id != "" {
		u, err := uuid.Parse(id)
		if err != nil {
			h.fail(w, r, http.StatusBadRequest, fmt.Sprintf("%q is not an event id (a UUID).", id))
			return
		}
		http.Redirect(w, r, h.cfg.BasePath+"events/"+u.String(), http.StatusSeeOther)
		return
	}
	f, err := parseFilter(q)
	if err != nil {
		h.fail(w, r, http.StatusBadRequest, "Bad filter: "+err.Error())
		return
	}
	l, err := h.list(r, f)
	if err != nil {
		h.failErr(w, r, err)
		return
	}
	h.render(w, r, http.StatusOK, "events", page{Title: "Events", Nav: "events", Data: struct {
		F     filter
		Query url.Values
		listing
	}{f, f.values(), l}})
}

// eventDetail is one event with everything the event page shows.
type eventDetail struct {
	eventRow
	ContentType string
	Size        int
	Headers     []header
	TraceURL    string
	Payload     string // empty until asked for
	PayloadNote string
	Shown       bool
	History     []outbox.Record
	Available   time.Time
}

type header struct{ Key, Value string }

func (h *Handler) event(w http.ResponseWriter, r *http.Request) {
	id, err := uuid.Parse(r.PathValue("id"))
	if err != nil {
		h.fail(w, r, http.StatusBadRequest, fmt.Sprintf("%q is not an event id (a UUID).", r.PathValue("id")))
		return
	}
	ctx, cancel := h.ctx(r)
	defer cancel()
	var (
		d       eventDetail
		data    []byte
		headers []byte
	)
	err = h.cfg.DB.QueryRowContext(ctx, `SELECT `+eventCols+`, event_data, headers, available_at
		FROM `+h.table.Quoted()+` WHERE event_id = $1`, id).Scan(&d.ID, &d.Seq, &d.Subject, &d.Type,
		&d.EntityType, &d.EntityID, &d.Status, &d.Attempts, &d.LastError, &d.CreatedAt, &d.PublishedAt,
		&data, &headers, &d.Available)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		h.fail(w, r, http.StatusNotFound, "No event has the id "+id.String()+".")
		return
	case err != nil:
		h.failErr(w, r, err)
		return
	}
	d.Size = len(data)
	var hm map[string]string
	_ = json.Unmarshal(headers, &hm)
	for k, v := range hm {
		d.Headers = append(d.Headers, header{k, v})
		if strings.EqualFold(k, outbox.HeaderContentType) {
			d.ContentType = v
		}
		if strings.EqualFold(k, "traceparent") && h.cfg.TraceURL != "" {
			if parts := strings.Split(v, "-"); len(parts) == 4 && len(parts[1]) == 32 {
				d.TraceURL = strings.ReplaceAll(h.cfg.TraceURL, "{trace_id}", parts[1])
			}
		}
	}
	sortHeaders(d.Headers)
	if r.URL.Query().Get("payload") == "1" {
		d.Shown = true
		d.Payload, d.PayloadNote = h.showPayload(data, d.ContentType)
	}
	if d.History, err = h.history.History(ctx, h.cfg.DB, d.EntityType, d.EntityID); err != nil {
		h.failErr(w, r, err)
		return
	}
	for i := range d.History {
		d.History[i].Data = nil // the timeline shows no payloads
	}
	h.render(w, r, http.StatusOK, "event", page{Title: "Event " + d.ID, Nav: "events", Data: d})
}

func sortHeaders(hs []header) {
	for i := 1; i < len(hs); i++ {
		for j := i; j > 0 && strings.ToLower(hs[j].Key) < strings.ToLower(hs[j-1].Key); j-- {
			hs[j], hs[j-1] = hs[j-1], hs[j]
		}
	}
}

// maxShown bounds the payload bytes the event page shows.
const maxShown = 256 << 10

// showPayload returns the payload as the page shows it: JSON masked and
// indented, other text as it is, binary as a hex dump; and a note.
func (h *Handler) showPayload(data []byte, contentType string) (string, string) {
	ct := strings.ToLower(contentType)
	if (ct == "" || strings.Contains(ct, "json")) && json.Valid(data) {
		masked, n := h.mask(data)
		var buf strings.Builder
		out, err := json.MarshalIndent(masked, "", "  ")
		if err != nil {
			return string(data), ""
		}
		buf.Write(out)
		note := ""
		if n > 0 {
			note = fmt.Sprintf("%d %s masked", n, pluralize(n, "value"))
		}
		return buf.String(), note
	}
	note := ""
	if len(h.masks) > 0 {
		note = "not JSON: shown unmasked"
	}
	if len(data) > maxShown {
		data = data[:maxShown]
		note = strings.TrimPrefix(note+"; first 256 KiB shown", "; ")
	}
	if utf8.Valid(data) {
		return string(data), note
	}
	return hex.Dump(data), strings.TrimPrefix(note+"; binary: hex dump", "; ")
}

func pluralize(n int, s string) string {
	if n == 1 {
		return s
	}
	return s + "s"
}

// errorGroup is the FAILED events sharing a last error.
type errorGroup struct {
	Error         string
	Count         int
	First, Latest time.Time
}

func (h *Handler) failed(w http.ResponseWriter, r *http.Request) {
	f, err := parseFilter(r.URL.Query())
	if err != nil {
		h.fail(w, r, http.StatusBadRequest, "Bad filter: "+err.Error())
		return
	}
	f.Status = "FAILED"
	ctx, cancel := h.ctx(r)
	defer cancel()
	st, err := poller.ReadStatusWith(ctx, h.cfg.DB, h.cfg.Table, poller.StatusOptions{Limit: listLimit, EstimateSuccess: true})
	if err != nil {
		h.failErr(w, r, err)
		return
	}
	rows, err := h.cfg.DB.QueryContext(ctx, `SELECT coalesce(last_error, ''), count(*), min(created_at), max(created_at)
		FROM `+h.table.Quoted()+` WHERE event_status = 'FAILED' GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT $1`, listLimit)
	groups, err := collect(rows, err, func(rows *sql.Rows) (errorGroup, error) {
		var g errorGroup
		return g, rows.Scan(&g.Error, &g.Count, &g.First, &g.Latest)
	})
	if err != nil {
		h.failErr(w, r, err)
		return
	}
	l, err := h.list(r, f)
	if err != nil {
		h.failErr(w, r, err)
		return
	}
	v := f.values()
	v.Del("status")
	h.render(w, r, http.StatusOK, "failed", page{Title: "FAILED and blocked", Nav: "failed", Data: struct {
		S        *poller.Status
		Groups   []errorGroup
		F        filter
		Query    url.Values
		Filtered bool
		listing
	}{st, groups, f, v, len(v) > 0, l}})
}

// requeueFilter reads the events a requeue form chooses: ids (a
// selection) or the FAILED page's filter, or all.
func requeueFilter(r *http.Request) (poller.RequeueFilter, filter, error) {
	var rf poller.RequeueFilter
	for _, id := range r.PostForm["id"] {
		u, err := uuid.Parse(id)
		if err != nil {
			return rf, filter{}, fmt.Errorf("%q is not an event id", id)
		}
		rf.IDs = append(rf.IDs, u.String())
	}
	f, err := parseFilter(r.PostForm)
	if err != nil {
		return rf, f, err
	}
	if f.Type != "" || f.Subject != "" || f.Status != "" && f.Status != "FAILED" {
		return rf, f, errors.New("a requeue chooses events by id, entity, time range or error text")
	}
	rf.Since, rf.Until, rf.ErrorContains = f.since, f.until, f.Error
	if f.EntityType != "" || f.EntityID != "" {
		if f.EntityType == "" || f.EntityID == "" {
			return rf, f, errors.New("an entity needs both a type and an id")
		}
		rf.EntityType, rf.EntityID = f.EntityType, f.EntityID
	}
	rf.All = r.PostForm.Get("all") == "1"
	return rf, f, nil
}

// confirmation is the page that asks before an action.
type confirmation struct {
	Action  string // form action, relative to the base
	Verb    string // "Requeue", "Replay"
	What    string // what will be done
	Count   int64
	Fields  []header
	Back    string
	Allowed bool
}

func (h *Handler) requeue(w http.ResponseWriter, r *http.Request) {
	if !h.authorize(w, r, ActionRequeue) {
		return
	}
	if err := r.ParseForm(); err != nil {
		h.fail(w, r, http.StatusBadRequest, "Bad form: "+err.Error())
		return
	}
	rf, f, err := requeueFilter(r)
	if err != nil {
		h.fail(w, r, http.StatusBadRequest, "Bad requeue: "+err.Error())
		return
	}
	ctx, cancel := h.ctx(r)
	defer cancel()
	if r.PostForm.Get("confirm") != "1" {
		n, err := poller.Requeue(ctx, h.cfg.DB, h.cfg.Table, rf, true)
		if errors.Is(err, poller.ErrNoSelector) {
			h.fail(w, r, http.StatusBadRequest, "Choose the events to requeue: tick some, or filter them.")
			return
		}
		if err != nil {
			h.fail(w, r, http.StatusBadRequest, "Bad requeue: "+err.Error())
			return
		}
		c := confirmation{Action: "requeue", Verb: "Requeue", Count: n, Back: "failed?" + f.values().Encode(), Allowed: true,
			What: fmt.Sprintf("Put %s FAILED %s back to READY, attempts reset, so the publisher sends them again at once.",
				groupDigits(n), pluralize(int(n), "event"))}
		for k, vs := range r.PostForm {
			for _, v := range vs {
				c.Fields = append(c.Fields, header{k, v})
			}
		}
		sortHeaders(c.Fields)
		h.render(w, r, http.StatusOK, "confirm", page{Title: "Confirm requeue", Nav: "failed", Data: c})
		return
	}
	n, err := poller.Requeue(ctx, h.cfg.DB, h.cfg.Table, rf, false)
	h.log.Info("console action", "action", ActionRequeue, "who", h.who(r), "remote", r.RemoteAddr,
		"ids", len(rf.IDs), "entity_type", rf.EntityType, "entity_id", rf.EntityID, "all", rf.All,
		"since", f.Since, "until", f.Until, "error_contains", rf.ErrorContains, "requeued", n, "err", err)
	if err != nil {
		h.failErr(w, r, fmt.Errorf("%w (%d events were requeued before the error)", err, n))
		return
	}
	back := "failed"
	if len(rf.IDs) == 1 && r.PostForm.Get("back") == "event" {
		back = "events/" + rf.IDs[0]
	}
	h.redirect(w, r, back, fmt.Sprintf("Requeued %s %s.", groupDigits(n), pluralize(int(n), "event")))
}

// consumerRow is one consumer's record in the processed table.
type consumerRow struct {
	ID    string
	Count int64
	Last  time.Time
}

func (h *Handler) consumers(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := h.ctx(r)
	defer cancel()
	data := struct {
		Table     string
		Missing   bool
		Consumers []consumerRow
		Consumer  string
		Event     string
		Looked    bool
		Found     bool
		At        time.Time
	}{Table: h.proc.String(), Consumer: strings.TrimSpace(r.URL.Query().Get("consumer")),
		Event: strings.TrimSpace(r.URL.Query().Get("event"))}
	rows, err := h.cfg.DB.QueryContext(ctx, `SELECT consumer_id, count(*), max(processed_at)
		FROM `+h.proc.Quoted()+` GROUP BY 1 ORDER BY 1 LIMIT 200`)
	data.Consumers, err = collect(rows, err, func(rows *sql.Rows) (consumerRow, error) {
		var c consumerRow
		return c, rows.Scan(&c.ID, &c.Count, &c.Last)
	})
	if pqErr := (*pq.Error)(nil); errors.As(err, &pqErr) && pqErr.Code == "42P01" {
		data.Missing, err = true, nil
	}
	if err != nil {
		h.failErr(w, r, err)
		return
	}
	if data.Consumer != "" && data.Event != "" && !data.Missing {
		data.Looked = true
		err := h.cfg.DB.QueryRowContext(ctx, `SELECT processed_at FROM `+h.proc.Quoted()+`
			WHERE consumer_id = $1 AND message_id = $2`, data.Consumer, data.Event).Scan(&data.At)
		switch {
		case errors.Is(err, sql.ErrNoRows):
		case err != nil:
			h.failErr(w, r, err)
			return
		default:
			data.Found = true
		}
	}
	h.render(w, r, http.StatusOK, "consumers", page{Title: "Consumers", Nav: "consumers", Data: data})
}

// setPause returns the handler of the pause (paused true) and resume
// actions: it sets the pause switch, logs who did it and redirects back to
// the page the form was on (the overview or the FAILED page).
func (h *Handler) setPause(paused bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if !h.authorize(w, r, ActionPause) {
			return
		}
		ctx, cancel := h.ctx(r)
		defer cancel()
		who := h.who(r)
		verb, msg := "resume", "Publishing resumed."
		if paused {
			verb, msg = "pause", "Publishing paused: publishers stop claiming within a second; events stay READY."
		}
		err := poller.SetPause(ctx, h.cfg.DB, h.cfg.Table, paused, who)
		h.log.Info("console action", "action", verb, "who", who, "remote", r.RemoteAddr, "err", err)
		if err != nil {
			h.failErr(w, r, err)
			return
		}
		back := ""
		if r.FormValue("back") == "failed" {
			back = "failed"
		}
		h.redirect(w, r, back, msg)
	}
}
