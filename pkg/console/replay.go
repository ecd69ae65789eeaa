package console

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/pgnats/outbox/internal/poller"
)

// replayTimeout bounds a replay the console starts: it runs on after the
// request that started it.
const replayTimeout = time.Hour

// replayFields are the replay form's fields, as typed.
type replayFields struct {
	EntityType, EntityID, FromSeq, ToSeq, Since, Until string
}

func readReplayFields(get func(string) string) replayFields {
	t := func(k string) string { return strings.TrimSpace(get(k)) }
	return replayFields{t("entity_type"), t("entity_id"), t("from_seq"), t("to_seq"), t("since"), t("until")}
}

// filter turns the fields into the replay's filter.
func (f replayFields) filter() (poller.ReplayFilter, error) {
	rf := poller.ReplayFilter{EntityType: f.EntityType, EntityID: f.EntityID}
	var err error
	for _, s := range []struct {
		name, v string
		p       *int64
	}{{"from seq", f.FromSeq, &rf.FromSeq}, {"to seq", f.ToSeq, &rf.ToSeq}} {
		if s.v == "" {
			continue
		}
		if *s.p, err = strconv.ParseInt(s.v, 10, 64); err != nil || *s.p < 1 {
			return rf, fmt.Errorf("%s %q: give a seq of at least 1", s.name, s.v)
		}
	}
	for _, s := range []struct {
		name, v string
		p       *time.Time
	}{{"since", f.Since, &rf.Since}, {"until", f.Until, &rf.Until}} {
		if s.v == "" {
			continue
		}
		if *s.p, err = parseTime(s.v); err != nil {
			return rf, fmt.Errorf("%s: %w", s.name, err)
		}
	}
	return rf, nil
}

func (h *Handler) replayForm(w http.ResponseWriter, r *http.Request) {
	f := readReplayFields(r.URL.Query().Get)
	h.render(w, r, http.StatusOK, "replay", page{Title: "Replay", Nav: "replay", Data: struct {
		F         replayFields
		Connected bool
	}{f, h.jetStreamAvailable()}})
}

func (h *Handler) jetStreamAvailable() bool {
	return h.cfg.JetStream != nil && h.cfg.JetStream() != nil
}

func (h *Handler) replay(w http.ResponseWriter, r *http.Request) {
	if !h.authorize(w, r, ActionReplay) {
		return
	}
	if err := r.ParseForm(); err != nil {
		h.fail(w, r, http.StatusBadRequest, "Bad form: "+err.Error())
		return
	}
	fields := readReplayFields(r.PostForm.Get)
	rf, err := fields.filter()
	if err != nil {
		h.fail(w, r, http.StatusBadRequest, "Bad replay: "+err.Error())
		return
	}
	ctx, cancel := h.ctx(r)
	defer cancel()
	res, err := poller.Replay(ctx, h.cfg.DB, nil, h.cfg.Table, rf, poller.ReplayOptions{DryRun: true}, nil)
	if err != nil {
		h.fail(w, r, http.StatusBadRequest, "Bad replay: "+err.Error())
		return
	}
	var js = h.cfg.JetStream
	if r.PostForm.Get("confirm") != "1" {
		c := confirmation{Action: "replay", Verb: "Replay", Count: res.Selected, Back: "replay",
			Allowed: h.jetStreamAvailable(),
			What: fmt.Sprintf("Publish %s SUCCESS %s again, in seq order, with Nats-Msg-Id <event id>:replay:<run id>. "+
				"pkg/dedup still drops them for consumers that processed them. The events table is not changed.",
				groupDigits(res.Selected), pluralize(int(res.Selected), "event"))}
		for k, v := range map[string]string{"entity_type": fields.EntityType, "entity_id": fields.EntityID,
			"from_seq": fields.FromSeq, "to_seq": fields.ToSeq, "since": fields.Since, "until": fields.Until} {
			if v != "" {
				c.Fields = append(c.Fields, header{k, v})
			}
		}
		sortHeaders(c.Fields)
		h.render(w, r, http.StatusOK, "confirm", page{Title: "Confirm replay", Nav: "replay", Data: c})
		return
	}
	if js == nil || js() == nil {
		h.fail(w, r, http.StatusServiceUnavailable, "No NATS connection to replay on: the console can only count the events.")
		return
	}
	if res.Selected == 0 {
		h.redirect(w, r, "replay", "No SUCCESS events match: nothing replayed.")
		return
	}
	runID := uuid.NewString()
	who := h.who(r)
	h.log.Info("console action", "action", ActionReplay, "who", who, "remote", r.RemoteAddr, "run_id", runID,
		"entity_type", rf.EntityType, "entity_id", rf.EntityID, "from_seq", rf.FromSeq, "to_seq", rf.ToSeq,
		"since", fields.Since, "until", fields.Until, "selected", res.Selected)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), replayTimeout)
		defer cancel()
		res, err := poller.Replay(ctx, h.cfg.DB, js(), h.cfg.Table, rf, poller.ReplayOptions{RunID: runID}, nil)
		if err != nil {
			h.log.Error("console replay stopped", "run_id", runID, "who", who, "published", res.Published, "err", err)
			return
		}
		h.log.Info("console replay done", "run_id", runID, "who", who, "published", res.Published, "duplicates", res.Duplicates)
	}()
	h.redirect(w, r, "replay", fmt.Sprintf("Replay %s started: %s %s. Its outcome is in the publisher's log.",
		runID, groupDigits(res.Selected), pluralize(int(res.Selected), "event")))
}
