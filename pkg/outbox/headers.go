package outbox

// NATS headers the publisher sets on every message. Consumers read the event
// id from HeaderEventID: it stays the same when an event is replayed, while
// the broker's Nats-Msg-Id may then carry a replay suffix.
const (
	HeaderMsgID      = "Nats-Msg-Id"
	HeaderEventID    = "Outbox-Event-Id"
	HeaderEventType  = "Outbox-Event-Type"
	HeaderEntityType = "Outbox-Entity-Type"
	HeaderEntityID   = "Outbox-Entity-Id"
	HeaderSeq        = "Outbox-Seq"
	HeaderCreatedAt  = "Outbox-Created-At"
	// HeaderReplay is set only on events published again by
	// `publisher replay`: the replay's run id, also the suffix of
	// Nats-Msg-Id ("<event id>:replay:<run id>").
	HeaderReplay = "Outbox-Replay"
)
