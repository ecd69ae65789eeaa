package outbox

import "github.com/pgnats/outbox/internal/wire"

// NATS headers the publisher sets on every message. Consumers read the event
// id from HeaderEventID: it stays the same when an event is replayed, while
// the broker's Nats-Msg-Id may then carry a replay suffix. Their values count
// toward an event's size (see Config.MaxBytes).
const (
	HeaderMsgID      = wire.HeaderMsgID
	HeaderEventID    = wire.HeaderEventID
	HeaderEventType  = wire.HeaderEventType
	HeaderEntityType = wire.HeaderEntityType
	HeaderEntityID   = wire.HeaderEntityID
	HeaderSeq        = wire.HeaderSeq
	HeaderCreatedAt  = wire.HeaderCreatedAt
	// HeaderReplay is set only on events published again by
	// `publisher replay`: the replay's run id, also the suffix of
	// Nats-Msg-Id ("<event id>:replay:<run id>").
	HeaderReplay = wire.HeaderReplay
)
