//! Refusals of unauthenticated clients, counted instead of written one by one: one
//! [`AuditEvent::RefusalsCoalesced`] per client, stage and reason per interval. Nothing a client
//! sends before its token verified grows the audit by more than a bounded entry per interval,
//! and the counter's memory is bounded too: at most `max_keys` distinct entries per interval,
//! every refusal beyond them counted in one overflow entry.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use super::AuditEvent;

/// What the coalesced entry is keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    client: String,
    stage: &'static str,
    reason: String,
    status: u16,
}

#[derive(Debug, Clone)]
struct Tally {
    count: u64,
    first_at: u64,
    last_at: u64,
    sample: String,
}

impl Tally {
    fn new(now: u64, sample: String) -> Self {
        Self {
            count: 0,
            first_at: now,
            last_at: now,
            sample,
        }
    }

    fn add(&mut self, now: u64) {
        self.count += 1;
        self.first_at = self.first_at.min(now);
        self.last_at = self.last_at.max(now);
    }
}

/// Where a refusal was counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// In its own (client, stage, reason) entry.
    Own,
    /// In the overflow entry: the interval already holds `max_keys` distinct entries.
    Overflow,
}

#[derive(Debug, Default)]
struct Window {
    entries: HashMap<Key, Tally>,
    overflow: Option<Tally>,
}

/// The refusals counted since the last [`RefusalCoalescer::drain`].
#[derive(Debug)]
pub struct RefusalCoalescer {
    max_keys: usize,
    window: Mutex<Window>,
}

/// One refusal to count. `reason` and `sample` must already be bounded by the caller (the API
/// bounds every text it shows or audits).
#[derive(Debug, Clone, Copy)]
pub struct Refused<'a> {
    /// The client (IPv4 address or IPv6 /64).
    pub client: &'a str,
    /// The refusing stage.
    pub stage: &'static str,
    /// The reason code.
    pub reason: &'a str,
    /// The HTTP status.
    pub status: u16,
    /// Unix seconds.
    pub now: u64,
}

impl RefusalCoalescer {
    /// Remembers at most `max_keys` distinct (client, stage, reason) entries per interval.
    pub fn new(max_keys: usize) -> Self {
        Self {
            max_keys: max_keys.max(1),
            window: Mutex::new(Window::default()),
        }
    }

    /// Counts one refusal; `sample` (called only for the first of an entry) explains it.
    pub fn record(&self, refused: Refused<'_>, sample: impl FnOnce() -> String) -> Counted {
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let key = Key {
            client: refused.client.to_string(),
            stage: refused.stage,
            reason: refused.reason.to_string(),
            status: refused.status,
        };
        let full = window.entries.len() >= self.max_keys;
        match window.entries.get_mut(&key) {
            Some(tally) => {
                tally.add(refused.now);
                Counted::Own
            }
            None if !full => {
                let mut tally = Tally::new(refused.now, sample());
                tally.add(refused.now);
                window.entries.insert(key, tally);
                Counted::Own
            }
            None => {
                window
                    .overflow
                    .get_or_insert_with(|| Tally::new(refused.now, String::new()))
                    .add(refused.now);
                Counted::Overflow
            }
        }
    }

    /// Takes everything counted so far as audit events (ordered, so the log is deterministic
    /// for a given set of counts) and starts a new interval.
    pub fn drain(&self) -> Vec<AuditEvent> {
        let window =
            std::mem::take(&mut *self.window.lock().unwrap_or_else(PoisonError::into_inner));
        let mut entries: Vec<(Key, Tally)> = window.entries.into_iter().collect();
        entries.sort_by(|(a, _), (b, _)| {
            (&a.client, a.stage, &a.reason, a.status)
                .cmp(&(&b.client, b.stage, &b.reason, b.status))
        });
        let mut events: Vec<AuditEvent> = entries
            .into_iter()
            .map(|(key, tally)| AuditEvent::RefusalsCoalesced {
                client: key.client,
                stage: key.stage.into(),
                reason: key.reason,
                status: key.status,
                count: tally.count,
                first_at: tally.first_at,
                last_at: tally.last_at,
                sample: tally.sample,
            })
            .collect();
        if let Some(tally) = window.overflow {
            events.push(AuditEvent::RefusalsCoalesced {
                client: "*".into(),
                stage: "*".into(),
                reason: "*".into(),
                status: 0,
                count: tally.count,
                first_at: tally.first_at,
                last_at: tally.last_at,
                sample: String::new(),
            });
        }
        events
    }

    /// Puts events back after a failed write, so their counts are not lost (they are merged
    /// with whatever was counted meanwhile; the overflow entry stays one entry).
    pub fn restore(&self, events: Vec<AuditEvent>) {
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        for event in events {
            let AuditEvent::RefusalsCoalesced {
                client,
                stage,
                reason,
                status,
                count,
                first_at,
                last_at,
                sample,
            } = event
            else {
                continue;
            };
            let earlier = Tally {
                count,
                first_at,
                last_at,
                sample,
            };
            let slot = if client == "*" || window.entries.len() >= self.max_keys {
                window
                    .overflow
                    .get_or_insert_with(|| Tally::new(first_at, String::new()))
            } else {
                window
                    .entries
                    .entry(Key {
                        client,
                        stage: static_stage(&stage),
                        reason,
                        status,
                    })
                    .or_insert_with(|| Tally::new(first_at, earlier.sample.clone()))
            };
            slot.count += earlier.count;
            slot.first_at = slot.first_at.min(earlier.first_at);
            slot.last_at = slot.last_at.max(earlier.last_at);
        }
    }
}

/// The stages an unauthenticated refusal can come from, as the static names the key holds.
fn static_stage(stage: &str) -> &'static str {
    match stage {
        "transport" => "transport",
        "request" => "request",
        "limits" => "limits",
        "token" => "token",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused<'a>(client: &'a str, reason: &'a str, now: u64) -> Refused<'a> {
        Refused {
            client,
            stage: "request",
            reason,
            status: 400,
            now,
        }
    }

    fn counts(events: &[AuditEvent]) -> Vec<(String, String, u64)> {
        events
            .iter()
            .map(|e| match e {
                AuditEvent::RefusalsCoalesced {
                    client,
                    reason,
                    count,
                    ..
                } => (client.clone(), reason.clone(), *count),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn one_entry_per_client_and_reason_with_a_count() {
        let c = RefusalCoalescer::new(16);
        for i in 0..200 {
            c.record(refused("192.0.2.1", "malformed", 100 + i / 100), || {
                "first".into()
            });
        }
        c.record(refused("192.0.2.1", "too-large", 150), || "big".into());
        c.record(refused("192.0.2.2", "malformed", 150), || "other".into());
        let events = c.drain();
        assert_eq!(
            counts(&events),
            [
                ("192.0.2.1".into(), "malformed".into(), 200),
                ("192.0.2.1".into(), "too-large".into(), 1),
                ("192.0.2.2".into(), "malformed".into(), 1),
            ]
        );
        let AuditEvent::RefusalsCoalesced {
            first_at,
            last_at,
            sample,
            ..
        } = &events[0]
        else {
            unreachable!()
        };
        assert_eq!((*first_at, *last_at, sample.as_str()), (100, 101, "first"));
        // A new interval starts empty.
        assert!(c.drain().is_empty());
    }

    #[test]
    fn distinct_keys_are_capped_and_the_rest_counted_in_one_overflow_entry() {
        let c = RefusalCoalescer::new(3);
        let clients: Vec<String> = (0..1000)
            .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
            .collect();
        let mut overflowed = 0;
        for client in &clients {
            if c.record(refused(client, "malformed", 1), String::new) == Counted::Overflow {
                overflowed += 1;
            }
        }
        assert_eq!(overflowed, 997);
        // A client already counted keeps its own entry.
        assert_eq!(
            c.record(refused(&clients[0], "malformed", 2), String::new),
            Counted::Own
        );
        let events = c.drain();
        assert_eq!(events.len(), 4);
        assert_eq!(counts(&events)[3], ("*".into(), "*".into(), 997));
        assert_eq!(counts(&events).iter().map(|(_, _, n)| n).sum::<u64>(), 1001);
    }

    #[test]
    fn restored_events_are_merged_with_what_came_meanwhile() {
        let c = RefusalCoalescer::new(2);
        c.record(refused("192.0.2.1", "malformed", 1), || "s".into());
        c.record(refused("192.0.2.2", "malformed", 1), String::new);
        c.record(refused("192.0.2.3", "malformed", 1), String::new);
        let failed = c.drain();
        c.record(refused("192.0.2.1", "malformed", 5), || "later".into());
        c.restore(failed);
        let events = c.drain();
        assert_eq!(
            counts(&events),
            [
                ("192.0.2.1".into(), "malformed".into(), 2),
                ("192.0.2.2".into(), "malformed".into(), 1),
                ("*".into(), "*".into(), 1),
            ]
        );
    }
}
