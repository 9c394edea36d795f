//! Records judged before any broker holds them: the embedded bus's gate
//! (`on_gate`) and the HTTP API's submissions (`on_submit`). The rules
//! themselves are in `state.rs`.

use bytes::Bytes;
use tokio::time::Instant;
use tracing::warn;

use super::{Delivery, Judged, Publish, Registry};
use crate::identity::Author;
use crate::protocol::{ErrorCode, ErrorPayload};
use crate::record::Name;

/// The bus session a gated publish comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    /// The publishing session's number (unique in this process).
    pub session: u64,
    /// Its will, published by the bus after it lost the client.
    pub will: bool,
    /// The session's will would clear this record (an empty publish on
    /// its `services/NAME`): the session keeps the record alive, and a
    /// record it writes is guarded by that will alone.
    pub guards: bool,
}

/// What a publish put to the gate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateKind {
    Record,
    Heartbeat,
}

impl Registry {
    /// A record submitted through the HTTP API for `raw` (empty: remove
    /// it), judged by the same rules as a live publish. The broker has not
    /// seen it: on acceptance the output holds the retained publish of the
    /// record (or the clear) and its event, and the answer is the event's
    /// JSON; on refusal the output holds the error and the `rejected` event
    /// (nothing to restore) and the answer is the error's JSON. A bad name
    /// publishes nothing (it may not even be a valid topic); removing a name
    /// that is not registered is answered `unknown` and publishes nothing.
    pub fn on_submit(
        &mut self,
        now: Instant,
        raw: &str,
        payload: Bytes,
        by: &Author,
    ) -> (Result<Bytes, Bytes>, Vec<Publish>) {
        let name = match Name::parse(raw) {
            Ok(n) => n,
            Err(e) => {
                self.stats.refusals += 1;
                warn!(name = raw, error = e.code().as_str(), detail = %e, "refused");
                let err = self.error(raw, e.code(), &e.to_string(), None, None);
                return (Err(err.payload), Vec::new());
            }
        };
        let (answer, mut out) = match self.on_record(now, raw, payload, Delivery::Live, by, None) {
            Judged::Accepted(ev) => (Ok(ev.payload.clone()), vec![self.current(raw), ev]),
            Judged::Refused { error, event, .. } => {
                (Err(error.payload.clone()), vec![error, event])
            }
            // A live submission is quiet only when it removes a free name.
            Judged::Quiet => {
                let detail = format!("{name} is not registered");
                let err = self.error(raw, ErrorCode::Unknown, &detail, None, None);
                (Err(err.payload), Vec::new())
            }
        };
        out.append(&mut self.extra);
        self.note_echoes(&out);
        (answer, out)
    }

    /// A record (empty: a removal) or a heartbeat published on the bus,
    /// judged before the bus stores or forwards it. Accepted: the output
    /// holds what the bus is to store and forward (the record, its clear,
    /// or the heartbeat) and the event; refused: the error and the
    /// `rejected` event only. An empty publish to a free or bad name is
    /// accepted and changes nothing, and so is a will from a session that
    /// no longer wrote the record last.
    pub fn on_gate(
        &mut self,
        now: Instant,
        kind: GateKind,
        raw: &str,
        payload: Bytes,
        by: &Author,
        from: Source,
    ) -> (Result<(), ErrorCode>, Vec<Publish>) {
        let from = Some(from);
        let (verdict, mut out) = match kind {
            GateKind::Record => match self.on_record(now, raw, payload, Delivery::Live, by, from) {
                Judged::Accepted(ev) => (Ok(()), vec![self.current(raw), ev]),
                Judged::Refused { code, error, event } => (Err(code), vec![error, event]),
                Judged::Quiet => (Ok(()), Vec::new()),
            },
            GateKind::Heartbeat => {
                let errors = self.on_heartbeat(now, raw, &payload, by, from);
                match errors.first() {
                    None => {
                        let beat = Publish {
                            topic: self.topics.heartbeat(raw),
                            payload,
                            retain: false,
                        };
                        (Ok(()), vec![beat])
                    }
                    Some(e) => {
                        let code = serde_json::from_slice::<ErrorPayload>(&e.payload)
                            .map_or(ErrorCode::Invalid, |p| p.error);
                        (Err(code), errors)
                    }
                }
            }
        };
        out.append(&mut self.extra);
        (verdict, out)
    }
}
