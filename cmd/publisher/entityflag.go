package main

import (
	"strings"
)

// entityFlags are the flags that choose one entity: --entity TYPE/ID, or
// --entity-type and --entity-id for a type that holds a slash (--entity
// splits at the first one, so an id may hold slashes but a type may not).
type entityFlags struct{ entity, typ, id string }

func (e *entityFlags) register(c *command, what string) {
	c.String(&e.entity, "entity", "", what+" of one entity, as TYPE/ID (split at the first slash)")
	c.String(&e.typ, "entity-type", "", "with --entity-id: the entity's type, which may hold slashes")
	c.String(&e.id, "entity-id", "", "with --entity-type: the entity's id")
}

// given reports whether any of the flags was set.
func (e *entityFlags) given() bool { return e.entity != "" || e.typ != "" || e.id != "" }

// parse returns the entity chosen, or empty strings when none was; a usage
// error names what is wrong.
func (e *entityFlags) parse(cmd string) (typ, id string, err error) {
	switch {
	case e.entity != "" && (e.typ != "" || e.id != ""):
		return "", "", usagef("%s: choose the entity with exactly one of --entity or --entity-type/--entity-id", cmd)
	case e.entity != "":
		typ, id, ok := strings.Cut(e.entity, "/")
		if !ok || typ == "" || id == "" {
			return "", "", usagef("%s: --entity %q: use TYPE/ID, e.g. order/42 (or --entity-type and --entity-id)", cmd, e.entity)
		}
		return typ, id, nil
	case (e.typ == "") != (e.id == ""):
		return "", "", usagef("%s: --entity-type and --entity-id go together", cmd)
	}
	return e.typ, e.id, nil
}
