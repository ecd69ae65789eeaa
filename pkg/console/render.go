package console

import (
	"bytes"
	"fmt"
	"html/template"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// page is what every template gets.
type page struct {
	Base       string
	Title      string
	Nav        string // the active menu entry
	Msg        string // the outcome of the last action
	Refresh    int    // seconds; 0: no auto-refresh
	CanRequeue bool
	CanReplay  bool
	CanPause   bool
	Data       any
}

var pageNames = []string{"overview", "events", "event", "failed", "confirm", "replay", "consumers", "error"}

func (h *Handler) parseTemplates() error {
	funcs := template.FuncMap{
		"url": func(p string) string { return h.cfg.BasePath + strings.TrimPrefix(p, "/") },
		"time": func(t time.Time) string {
			if t.IsZero() {
				return "-"
			}
			return t.UTC().Format("2006-01-02 15:04:05")
		},
		"ptime": func(t *time.Time) string {
			if t == nil {
				return "-"
			}
			return t.UTC().Format("2006-01-02 15:04:05")
		},
		"ago":   ago,
		"deref": func(t *time.Time) time.Time { return *t },
		"query": func(v url.Values) string { return v.Encode() },
		"short": func(s string, n int) string {
			s = strings.Join(strings.Fields(s), " ")
			if len(s) > n {
				return s[:n] + "…"
			}
			return s
		},
		"num":   func(n int) string { return groupDigits(int64(n)) },
		"num64": groupDigits,
		"lower": strings.ToLower,
	}
	layout, err := template.New("layout.html").Funcs(funcs).ParseFS(templateFS, "templates/layout.html")
	if err != nil {
		return fmt.Errorf("console: templates: %w", err)
	}
	h.pages = map[string]*template.Template{}
	for _, name := range pageNames {
		t, err := template.Must(layout.Clone()).ParseFS(templateFS, "templates/"+name+".html")
		if err != nil {
			return fmt.Errorf("console: templates: %w", err)
		}
		h.pages[name] = t
	}
	return nil
}

// render writes page name with status code.
func (h *Handler) render(w http.ResponseWriter, r *http.Request, code int, name string, p page) {
	p.Base = h.cfg.BasePath
	p.Msg = r.URL.Query().Get("msg")
	p.CanRequeue = h.allowed(r, ActionRequeue)
	p.CanPause = h.allowed(r, ActionPause)
	p.CanReplay = h.allowed(r, ActionReplay)
	var buf bytes.Buffer
	if err := h.pages[name].ExecuteTemplate(&buf, "layout.html", p); err != nil {
		h.log.Error("console page failed to render", "page", name, "err", err)
		http.Error(w, "the page failed to render", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_, _ = w.Write(buf.Bytes())
}

// fail renders the error page.
func (h *Handler) fail(w http.ResponseWriter, r *http.Request, code int, msg string) {
	h.render(w, r, code, "error", page{Title: http.StatusText(code), Data: struct {
		Code int
		Text string
	}{code, msg}})
}

// failErr renders a failed query as 500 and logs it.
func (h *Handler) failErr(w http.ResponseWriter, r *http.Request, err error) {
	h.log.Error("console query failed", "path", r.URL.Path, "err", err)
	h.fail(w, r, http.StatusInternalServerError, "The database could not answer: "+err.Error())
}

func ago(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return duration(time.Since(t)) + " ago"
}

// duration spells d briefly: 3s, 4m10s, 2h5m, 3d4h.
func duration(d time.Duration) string {
	switch {
	case d < time.Second:
		return strconv.FormatInt(d.Milliseconds(), 10) + "ms"
	case d < time.Minute:
		return strconv.Itoa(int(d.Seconds())) + "s"
	case d < time.Hour:
		return fmt.Sprintf("%dm%02ds", int(d.Minutes()), int(d.Seconds())%60)
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh%02dm", int(d.Hours()), int(d.Minutes())%60)
	default:
		return fmt.Sprintf("%dd%02dh", int(d.Hours())/24, int(d.Hours())%24)
	}
}

// groupDigits writes n with thin spaces between groups of three digits.
func groupDigits(n int64) string {
	s := strconv.FormatInt(n, 10)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteString("\u202f")
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

func urlQueryEscape(s string) string { return url.QueryEscape(s) }
