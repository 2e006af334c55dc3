//! Local publish/subscribe for devices on the front door: what a device publishes reaches the
//! sessions whose filters match, *after* it is committed; retained messages are kept (the last
//! per topic; an empty payload clears it) and sent to new matching subscriptions.
//!
//! Each client id has a session: its filters (with their QoS) and a bounded queue of messages
//! to send. A connection drains its session's queue; QoS 1 messages it sent but that were not
//! acknowledged go back to the queue when it ends. A persistent session (3.1.1
//! `clean_session = 0`, MQTT 5 session expiry > 0) outlives its connection, so a device that
//! reconnects gets what was published meanwhile. Persistent sessions (filters, QoS 1 messages
//! queued or sent and not yet acknowledged) and retained messages also survive a restart: what
//! changed is collected by [`PubSub::changes`] and saved in the buffer file by
//! [`super::persist`], and [`PubSub::restore`] brings it back at start.
//!
//! Fan-out runs off the buffer writer's thread: the commit callback only updates the retained
//! store and appends the message to a bounded queue ([`PubSub::committed`]); a task
//! ([`PubSub::run_fanout`]) looks the topic up in a trie of every session's filters
//! ([`FilterIndex`]) and queues it for the matching sessions, a batch per lock.
//!
//! Subscribers never slow publishers: a full session queue drops its oldest message, and a
//! fan-out queue past [`FANOUT_QUEUE_BYTES`] drops the new message for local subscribers (it is
//! committed and delivered to destinations all the same); both are counted in
//! `edgehose_local_fanout_dropped_total`.
//!
//! Why not rumqttd's local links, as first planned: rumqttd 0.20 gives an embedder no way to
//! disconnect a local link (each closed subscriber would hold a router slot forever), subscribes
//! local links with `RetainForwardRule::Never` (retained messages never reach them), and offers
//! no clean-session choice for them.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

use super::wake::{self, Wake};

use super::filter_index::FilterIndex;
use crate::buffer::sessions::{QueueChange, Saved, SavedMessage, SavedSession, SessionChanges};
use crate::metrics as m;
use crate::templates::topic::TopicFilter;

/// Messages a session holds for its device before the oldest is dropped.
pub const SESSION_QUEUE: usize = 1024;
/// Topic filters one session may hold: IoT Core's subscriptions per connection. Past it a
/// SUBSCRIBE's new filters are refused (MQTT 5: Quota exceeded), so one client cannot make every
/// publish scan thousands of its filters.
pub const MAX_FILTERS: usize = 50;
/// Topic and payload bytes of committed messages waiting for the fan-out task; past it a
/// message is not fanned out (counted as dropped).
pub const FANOUT_QUEUE_BYTES: usize = 16 << 20;
/// Messages the fan-out task handles per lock of the sessions.
const FANOUT_BATCH: usize = 256;

/// Bounds on what clients can make the gateway keep in memory for them.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Retained messages kept, and their bytes (topic + payload); past either a message is
    /// still committed and fanned out, but not retained (counted).
    pub max_retained: usize,
    pub max_retained_bytes: usize,
    /// Persistent sessions kept while their device is offline, and for how long (IoT Core's
    /// default persistent-session expiry is one hour); past the count the oldest goes first.
    pub max_offline_sessions: usize,
    pub session_expiry: std::time::Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            max_retained: 10_000,
            max_retained_bytes: 16 << 20,
            max_offline_sessions: 10_000,
            session_expiry: std::time::Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub topic: Bytes,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// Sent before and not acknowledged: MQTT's DUP flag on the resend.
    pub dup: bool,
    /// Its place in the session's queue (persistence keeps it in this order).
    pub seq: u64,
}

impl Delivery {
    fn saved(&self) -> SavedMessage {
        SavedMessage {
            seq: self.seq,
            topic: self.topic.clone(),
            payload: self.payload.clone(),
            qos: self.qos,
            retain: self.retain,
            dup: self.dup,
        }
    }
}

struct Session {
    /// Bumped by every connection that opens this session; only the latest may close it.
    generation: u64,
    persistent: bool,
    filters: Vec<(TopicFilter, u8)>,
    queue: VecDeque<Delivery>,
    /// The connection that has the session (its latest, if it was taken over).
    wake: Arc<Wake>,
    /// When its last connection ended (persistent sessions kept offline).
    offline_since: Option<std::time::Instant>,
    /// The next message's `seq`.
    next_seq: u64,
    /// Persistent sessions: QoS 1 messages sent and not yet acknowledged, by `seq` (saved with
    /// the queue, so a restart sends them again).
    inflight: BTreeMap<u64, Delivery>,
    save: SaveState,
}

/// What changed in a persistent session since it was last saved.
#[derive(Debug, Default)]
struct SaveState {
    /// Anything (it is in `Inner::dirty`).
    dirty: bool,
    filters: bool,
    /// The saved queue must be replaced whole (new session, messages put back out of order).
    rewrite: bool,
    /// Messages up to this `seq` are saved (unless `rewrite`).
    saved_upto: u64,
}

impl Session {
    fn new(generation: u64, persistent: bool, wake: Arc<Wake>) -> Self {
        Self {
            generation,
            persistent,
            filters: Vec::new(),
            queue: VecDeque::new(),
            wake,
            offline_since: None,
            next_seq: 1,
            inflight: BTreeMap::new(),
            save: SaveState {
                dirty: persistent,
                filters: persistent,
                rewrite: persistent,
                saved_upto: 0,
            },
        }
    }

    fn push(&mut self, mut d: Delivery) {
        d.seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push_back(d);
    }
}

/// What a connection gets when it opens its session.
pub struct Opened {
    pub present: bool,
    pub generation: u64,
}

#[derive(Default)]
pub struct PubSub {
    bounds: Bounds,
    inner: Mutex<Inner>,
    /// Its own lock: the commit callback updates it without waiting for a fan-out batch.
    retained: Mutex<Retained>,
    queue: Mutex<Queued>,
    queued: Notify,
    /// (filter, session) entries in the index: lets publishers skip the locks.
    subscribed: AtomicUsize,
    /// Something to save changed (persistent sessions, retained messages).
    changed: Notify,
}

#[derive(Default)]
struct Retained {
    messages: HashMap<Bytes, Bytes>,
    /// Topic + payload bytes of `messages`.
    bytes: usize,
    /// Topics set or cleared since the last save.
    changed: HashSet<Bytes>,
}

/// Committed messages waiting for the fan-out task.
#[derive(Default)]
struct Queued {
    messages: VecDeque<(Bytes, Bytes, u8)>,
    bytes: usize,
}

#[derive(Default)]
struct Inner {
    /// Boxed: the table has room for more sessions than it holds, and a device that only
    /// publishes has one too (10,000 idle devices: ~1 MiB less).
    sessions: HashMap<Arc<str>, Box<Session>>,
    /// Every session's filters, for fan-out.
    index: FilterIndex,
    /// When offline sessions were last swept (at most once a second: a sweep visits every
    /// session).
    swept: Option<std::time::Instant>,
    /// Sessions with `offline_since` set.
    offline: usize,
    generation: u64,
    /// Persistent sessions changed since the last save, and those that ended.
    dirty: HashSet<Arc<str>>,
    removed: HashSet<Arc<str>>,
}

impl Inner {
    /// Removes a session and its filters from the index.
    fn remove(&mut self, client_id: &str) -> Option<Box<Session>> {
        let (id, s) = self.sessions.remove_entry(client_id)?;
        for (f, _) in &s.filters {
            self.index.remove(f, client_id);
        }
        if s.persistent {
            self.dirty.remove(client_id);
            self.removed.insert(id);
        }
        Some(s)
    }

    /// Notes a change to a persistent session for the next save.
    fn touch(&mut self, client_id: &str, what: impl FnOnce(&mut SaveState)) {
        let Some((id, s)) = self.sessions.get_key_value(client_id) else {
            return;
        };
        if !s.persistent {
            return;
        }
        let id = Arc::clone(id);
        let s = self.sessions.get_mut(client_id).expect("just found");
        what(&mut s.save);
        if !s.save.dirty {
            s.save.dirty = true;
            self.dirty.insert(id);
        }
    }
}

impl PubSub {
    pub fn new(bounds: Bounds) -> Self {
        Self {
            bounds,
            ..Self::default()
        }
    }

    /// Drops offline persistent sessions past their expiry, and the oldest past the count.
    fn expire(&self, inner: &mut Inner) {
        let now = std::time::Instant::now();
        let due = inner
            .swept
            .is_none_or(|t| now.duration_since(t) >= std::time::Duration::from_secs(1));
        let over = inner.offline > self.bounds.max_offline_sessions;
        if !due && !over && !self.bounds.session_expiry.is_zero() {
            return;
        }
        inner.swept = Some(now);
        let expiry = self.bounds.session_expiry;
        let before = inner.sessions.len();
        let mut offline: Vec<(std::time::Instant, Arc<str>)> = inner
            .sessions
            .iter()
            .filter_map(|(id, s)| s.offline_since.map(|t| (t, Arc::clone(id))))
            .collect();
        offline.sort();
        let excess = offline
            .len()
            .saturating_sub(self.bounds.max_offline_sessions);
        for (i, (since, id)) in offline.into_iter().enumerate() {
            if i < excess || now.duration_since(since) >= expiry {
                inner.remove(&id);
            }
        }
        inner.offline = inner
            .sessions
            .values()
            .filter(|s| s.offline_since.is_some())
            .count();
        let gone = before - inner.sessions.len();
        if gone > 0 {
            metrics::counter!(m::SESSIONS_EXPIRED).increment(gone as u64);
        }
    }

    /// Whether a committed message with this retain flag needs `publish`.
    pub fn wants(&self, retain: bool) -> bool {
        retain || self.subscribed.load(Ordering::Relaxed) > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn recount(&self, inner: &Inner) {
        self.subscribed.store(inner.index.len(), Ordering::Relaxed);
        self.signal(inner);
    }

    /// Wakes the saver if a persistent session changed.
    fn signal(&self, inner: &Inner) {
        if !inner.dirty.is_empty() || !inner.removed.is_empty() {
            self.changed.notify_one();
        }
    }

    /// Returns once something to save has changed since the last call.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Opens `client_id`'s session for a new connection, woken by `wake` when the session's
    /// queue has something: resumes a persistent one when asked to, else starts afresh.
    pub fn open(&self, client_id: &str, persistent: bool, wake: &Arc<Wake>) -> Opened {
        let mut guard = self.lock();
        let inner: &mut Inner = &mut guard;
        self.expire(inner);
        inner.generation += 1;
        let generation = inner.generation;
        let resumed = match inner.sessions.get_mut(client_id) {
            Some(s) if persistent && s.persistent => {
                s.generation = generation;
                s.wake = Arc::clone(wake);
                if s.offline_since.take().is_some() {
                    inner.offline -= 1;
                }
                true
            }
            _ => false,
        };
        let opened = if resumed {
            inner.touch(client_id, |_| {});
            wake.raise(wake::QUEUED);
            Opened {
                present: true,
                generation,
            }
        } else {
            let replaced = inner.remove(client_id);
            let id: Arc<str> = client_id.into();
            if persistent {
                inner.dirty.insert(Arc::clone(&id));
            }
            inner.sessions.insert(
                id,
                Box::new(Session::new(generation, persistent, Arc::clone(wake))),
            );
            if replaced.is_some_and(|s| s.offline_since.is_some()) {
                inner.offline -= 1;
            }
            Opened {
                present: false,
                generation,
            }
        };
        self.recount(inner);
        opened
    }

    /// A connection ended. Its unacknowledged QoS 1 messages go back to the front of the queue;
    /// a session that is not persistent ends with its (latest) connection.
    pub fn close(&self, client_id: &str, generation: u64, unacked: Vec<Delivery>) {
        let mut guard = self.lock();
        let inner: &mut Inner = &mut guard;
        let Some(s) = inner.sessions.get_mut(client_id) else {
            return;
        };
        let latest = s.generation == generation;
        if s.persistent {
            let requeued = !unacked.is_empty();
            for mut d in unacked.into_iter().rev() {
                s.inflight.remove(&d.seq);
                d.dup = true;
                s.queue.push_front(d);
            }
            if latest {
                if s.offline_since.replace(std::time::Instant::now()).is_none() {
                    inner.offline += 1;
                }
            } else {
                // A newer connection owns the session: let it see the requeued messages.
                s.wake.raise(wake::QUEUED);
            }
            inner.touch(client_id, |save| save.rewrite |= requeued);
        } else if latest {
            inner.remove(client_id);
        }
        self.expire(inner);
        self.recount(inner);
    }

    /// Called once a message is committed (on the buffer writer's thread, so it only takes
    /// short locks): keeps it if retained, and queues it for the fan-out task if anyone
    /// subscribes.
    pub fn committed(&self, topic: Bytes, payload: Bytes, qos: u8, retain: bool) {
        if retain {
            self.retain(&topic, &payload);
        }
        if self.subscribed.load(Ordering::Relaxed) == 0 {
            return;
        }
        let size = topic.len() + payload.len();
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.bytes + size > FANOUT_QUEUE_BYTES {
            drop(q);
            metrics::counter!(m::LOCAL_FANOUT_DROPPED).increment(1);
            return;
        }
        q.bytes += size;
        q.messages.push_back((topic, payload, qos));
        drop(q);
        self.queued.notify_one();
    }

    /// Fans queued messages out to the matching sessions, until the task is dropped.
    pub async fn run_fanout(&self) {
        let mut batch = Vec::with_capacity(FANOUT_BATCH);
        loop {
            {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                let n = q.messages.len().min(FANOUT_BATCH);
                batch.extend(q.messages.drain(..n));
                q.bytes -= batch
                    .iter()
                    .map(|(t, p, _)| t.len() + p.len())
                    .sum::<usize>();
            }
            if batch.is_empty() {
                self.queued.notified().await;
                continue;
            }
            self.fan_out(batch.drain(..));
            // Let the connections this batch woke take their messages.
            tokio::task::yield_now().await;
        }
    }

    /// Keeps a retained message (an empty payload clears the topic's), within the bounds.
    fn retain(&self, topic: &Bytes, payload: &Bytes) {
        let mut r = self.retained.lock().unwrap_or_else(|p| p.into_inner());
        let old = r.messages.get(topic).map_or(0, |p| topic.len() + p.len());
        if payload.is_empty() {
            if r.messages.remove(topic).is_some() {
                r.changed.insert(topic.clone());
                self.changed.notify_one();
            }
            r.bytes -= old;
            return;
        }
        let bytes = r.bytes - old + topic.len() + payload.len();
        let count = r.messages.len() + usize::from(old == 0);
        if bytes <= self.bounds.max_retained_bytes && count <= self.bounds.max_retained {
            r.messages.insert(topic.clone(), payload.clone());
            r.bytes = bytes;
            r.changed.insert(topic.clone());
            self.changed.notify_one();
        } else {
            metrics::counter!(m::RETAINED_REFUSED).increment(1);
            static LOG: crate::ratelimit::LogLimit = crate::ratelimit::LogLimit::new();
            if let Some(suppressed) = LOG.allow() {
                tracing::warn!(
                    topic = ?String::from_utf8_lossy(topic),
                    retained = r.messages.len(),
                    retained_bytes = r.bytes,
                    suppressed,
                    "retained messages are at their bound: this one is delivered but not retained"
                );
            }
        }
    }

    /// Retains and fans out at once, without the queue (tests, and callers that are not on
    /// the commit path).
    pub fn publish(&self, topic: Bytes, payload: Bytes, qos: u8, retain: bool) {
        if retain {
            self.retain(&topic, &payload);
        }
        self.fan_out(std::iter::once((topic, payload, qos)));
    }

    /// Queues each message for the sessions whose filters match its topic.
    fn fan_out(&self, messages: impl Iterator<Item = (Bytes, Bytes, u8)>) {
        let mut guard = self.lock();
        let inner: &mut Inner = &mut guard;
        let mut matched = Vec::new();
        let mut dropped = 0u64;
        for (topic, payload, qos) in messages {
            let Ok(text) = std::str::from_utf8(&topic) else {
                continue;
            };
            matched.clear();
            inner.index.matches(text, &mut matched);
            for (id, granted) in &matched {
                let Some(s) = inner.sessions.get_mut(&**id) else {
                    continue;
                };
                if s.queue.len() >= SESSION_QUEUE {
                    s.queue.pop_front();
                    dropped += 1;
                }
                s.push(Delivery {
                    topic: topic.clone(),
                    payload: payload.clone(),
                    qos: (*granted).min(qos),
                    retain: false,
                    dup: false,
                    seq: 0,
                });
                s.wake.raise(wake::QUEUED);
                if s.persistent && !s.save.dirty {
                    s.save.dirty = true;
                    inner.dirty.insert(Arc::clone(id));
                }
            }
        }
        if dropped > 0 {
            metrics::counter!(m::LOCAL_FANOUT_DROPPED).increment(dropped);
        }
        self.signal(inner);
    }

    /// How many more filters the session may hold ([`MAX_FILTERS`] in all).
    pub fn filter_room(&self, client_id: &str) -> usize {
        let inner = self.lock();
        let held = inner.sessions.get(client_id).map_or(0, |s| s.filters.len());
        MAX_FILTERS.saturating_sub(held)
    }

    /// Whether the session already holds this filter (subscribing again only changes its QoS).
    pub fn has_filter(&self, client_id: &str, filter: &TopicFilter) -> bool {
        let inner = self.lock();
        inner
            .sessions
            .get(client_id)
            .is_some_and(|s| s.filters.iter().any(|(f, _)| f == filter))
    }

    /// Adds filters (with their granted QoS) to a session; queues the retained messages they
    /// match, to be sent after the SUBACK.
    pub fn subscribe(&self, client_id: &str, filters: &[(TopicFilter, u8)]) {
        let retained: Vec<(Bytes, Bytes)> = self
            .retained
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .messages
            .iter()
            .filter(|(topic, _)| {
                std::str::from_utf8(topic).is_ok_and(|t| filters.iter().any(|(f, _)| f.matches(t)))
            })
            .map(|(t, p)| (t.clone(), p.clone()))
            .collect();
        let mut guard = self.lock();
        let inner: &mut Inner = &mut guard;
        let id = inner
            .sessions
            .get_key_value(client_id)
            .map(|(k, _)| Arc::clone(k));
        if let (Some(id), Some(s)) = (id, inner.sessions.get_mut(client_id)) {
            for (f, q) in filters {
                match s.filters.iter_mut().find(|(g, _)| g == f) {
                    Some(existing) => existing.1 = *q,
                    None => s.filters.push((f.clone(), *q)),
                }
                inner.index.insert(f, &id, *q);
            }
            for (topic, payload) in retained {
                let qos = filters
                    .iter()
                    .filter(|(f, _)| std::str::from_utf8(&topic).is_ok_and(|t| f.matches(t)))
                    .map(|(_, q)| *q)
                    .max()
                    .unwrap_or(0);
                s.push(Delivery {
                    topic,
                    payload,
                    qos,
                    retain: true,
                    dup: false,
                    seq: 0,
                });
            }
            s.wake.raise(wake::QUEUED);
            inner.touch(client_id, |save| save.filters = true);
        }
        self.recount(inner);
    }

    pub fn unsubscribe(&self, client_id: &str, filters: &[String]) {
        let mut guard = self.lock();
        let inner: &mut Inner = &mut guard;
        if let Some(s) = inner.sessions.get_mut(client_id) {
            s.filters.retain(|(f, _)| {
                let gone = filters.iter().any(|u| u == f.as_str());
                if gone {
                    inner.index.remove(f, client_id);
                }
                !gone
            });
            inner.touch(client_id, |save| save.filters = true);
        }
        self.recount(inner);
    }

    /// Takes up to `max` queued messages for a session.
    pub fn take(&self, client_id: &str, max: usize) -> Vec<Delivery> {
        let mut guard = self.lock();
        let inner: &mut Inner = &mut guard;
        let Some(s) = inner.sessions.get_mut(client_id) else {
            return Vec::new();
        };
        let n = max.min(s.queue.len());
        let taken: Vec<Delivery> = s.queue.drain(..n).collect();
        if s.persistent && n > 0 {
            for d in taken.iter().filter(|d| d.qos > 0) {
                s.inflight.insert(d.seq, d.clone());
            }
            inner.touch(client_id, |_| {});
            self.signal(inner);
        }
        taken
    }

    /// What changed since the last call: persistent sessions (filters, QoS 1 messages queued
    /// or in flight, when they went offline), sessions that ended, retained messages. Marks it
    /// saved; if saving fails, [`Self::save_failed`] marks it changed again.
    pub fn changes(&self) -> SessionChanges {
        let mut out = SessionChanges::default();
        {
            let mut r = self.retained.lock().unwrap_or_else(|p| p.into_inner());
            let r: &mut Retained = &mut r;
            out.retained = r
                .changed
                .drain()
                .map(|t| {
                    let p = r.messages.get(&t).cloned();
                    (t, p)
                })
                .collect();
        }
        let mut guard = self.lock();
        let inner: &mut Inner = &mut guard;
        let (mono, wall) = (std::time::Instant::now(), crate::clock::now_ms());
        out.removed = inner.removed.drain().map(|id| id.to_string()).collect();
        for id in std::mem::take(&mut inner.dirty) {
            let Some(s) = inner.sessions.get_mut(&*id) else {
                continue;
            };
            let qos1 = |d: &&Delivery| d.qos > 0;
            let queue = if s.save.rewrite {
                let mut all: Vec<SavedMessage> = s
                    .inflight
                    .values()
                    .chain(s.queue.iter())
                    .filter(qos1)
                    .map(Delivery::saved)
                    .collect();
                all.sort_by_key(|m| m.seq);
                QueueChange::Rewrite(all)
            } else {
                let upto = s.save.saved_upto;
                let mut added: Vec<SavedMessage> = s
                    .inflight
                    .range(upto + 1..)
                    .map(|(_, d)| d)
                    .chain(s.queue.iter().filter(|d| d.seq > upto))
                    .filter(qos1)
                    .map(Delivery::saved)
                    .collect();
                added.sort_by_key(|m| m.seq);
                // Kept: everything from the oldest message still in flight or queued.
                let keep_from = [
                    s.inflight.keys().next().copied(),
                    s.queue.front().map(|d| d.seq),
                ]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(s.next_seq);
                QueueChange::Append { keep_from, added }
            };
            out.sessions.push(SavedSession {
                client_id: id.to_string(),
                offline_since_ms: s.offline_since.map(|t| {
                    wall - i64::try_from(mono.duration_since(t).as_millis()).unwrap_or(i64::MAX)
                }),
                filters: s.save.filters.then(|| {
                    s.filters
                        .iter()
                        .map(|(f, q)| (f.as_str().to_string(), *q))
                        .collect()
                }),
                queue,
            });
            s.save = SaveState {
                saved_upto: s.next_seq - 1,
                ..SaveState::default()
            };
        }
        out
    }

    /// Saving `changes` failed: they are marked changed again, to be saved whole next time.
    pub fn save_failed(&self, changes: SessionChanges) {
        {
            let mut r = self.retained.lock().unwrap_or_else(|p| p.into_inner());
            r.changed
                .extend(changes.retained.into_iter().map(|(t, _)| t));
        }
        let mut guard = self.lock();
        let inner: &mut Inner = &mut guard;
        for id in changes.removed {
            if !inner.sessions.contains_key(id.as_str()) {
                inner.removed.insert(id.into());
            }
        }
        for s in changes.sessions {
            inner.touch(&s.client_id, |save| {
                save.filters = true;
                save.rewrite = true;
            });
        }
        self.changed.notify_one();
    }

    /// Brings back what a previous run saved: persistent sessions (offline, their expiry
    /// counted from when their device went offline, by the wall clock), their filters and
    /// queued messages, and retained messages, within the bounds. Call before any connection.
    pub fn restore(&self, saved: Saved) -> (usize, usize) {
        let (mono, wall) = (std::time::Instant::now(), crate::clock::now_ms());
        let mut restored = 0;
        let mut guard = self.lock();
        let inner: &mut Inner = &mut guard;
        for saved in saved.sessions {
            let id: Arc<str> = saved.client_id.as_str().into();
            let mut s = Session::new(0, true, Arc::default());
            // Offline for as long as the wall clock says (none of it if it stepped back).
            let away = saved
                .offline_since_ms
                .map_or(0, |t| u64::try_from(wall - t).unwrap_or(0));
            s.offline_since = Some(
                mono.checked_sub(std::time::Duration::from_millis(away))
                    .unwrap_or(mono),
            );
            for (text, q) in saved.filters.unwrap_or_default() {
                match TopicFilter::parse(&text) {
                    Ok(f) => {
                        inner.index.insert(&f, &id, q);
                        s.filters.push((f, q));
                    }
                    Err(e) => {
                        tracing::warn!(client_id = ?saved.client_id, error = %e, "a saved subscription is not a valid filter: dropped")
                    }
                }
            }
            if let QueueChange::Rewrite(messages) = saved.queue {
                for m in messages {
                    s.next_seq = s.next_seq.max(m.seq + 1);
                    s.queue.push_back(Delivery {
                        topic: m.topic,
                        payload: m.payload,
                        qos: m.qos,
                        retain: m.retain,
                        dup: m.dup,
                        seq: m.seq,
                    });
                }
            }
            s.save = SaveState {
                saved_upto: s.next_seq - 1,
                ..SaveState::default()
            };
            inner.sessions.insert(id, Box::new(s));
            inner.offline += 1;
            restored += 1;
        }
        drop(guard);
        let retained = saved.retained.len();
        {
            let mut r = self.retained.lock().unwrap_or_else(|p| p.into_inner());
            for (t, p) in saved.retained {
                r.bytes += t.len() + p.len();
                r.messages.insert(t, p);
            }
        }
        let mut guard = self.lock();
        self.expire(&mut guard);
        self.recount(&guard);
        (restored, retained)
    }

    /// The device acknowledged a QoS 1 message `take` gave its connection.
    pub fn acked(&self, client_id: &str, seq: u64) {
        let mut guard = self.lock();
        let inner: &mut Inner = &mut guard;
        if let Some(s) = inner.sessions.get_mut(client_id) {
            if s.persistent && s.inflight.remove(&seq).is_some() {
                inner.touch(client_id, |_| {});
                self.signal(inner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str, q: u8) -> (TopicFilter, u8) {
        (TopicFilter::parse(s).unwrap(), q)
    }

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    #[test]
    fn matching_sessions_get_committed_messages_at_the_lower_qos() {
        let ps = PubSub::default();
        assert!(!ps.wants(false));
        let a = ps.open("a", false, &Arc::default());
        assert!(!a.present);
        ps.subscribe("a", &[f("sensors/+/telemetry", 1)]);
        assert!(ps.wants(false));
        ps.publish(b("sensors/d1/telemetry"), b("q1"), 1, false);
        ps.publish(b("sensors/d1/telemetry"), b("q0"), 0, false);
        ps.publish(b("other"), b("x"), 1, false);
        let got = ps.take("a", 10);
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].qos, got[1].qos), (1, 0));
        ps.unsubscribe("a", &["sensors/+/telemetry".into()]);
        ps.publish(b("sensors/d1/telemetry"), b("q1"), 1, false);
        assert!(ps.take("a", 10).is_empty());
        ps.close("a", a.generation, vec![]);
        assert!(!ps.wants(false));
    }

    #[test]
    fn retained_messages_reach_new_subscriptions_and_empty_payloads_clear_them() {
        let ps = PubSub::default();
        ps.publish(b("config/d1"), b("v1"), 1, true);
        ps.open("a", false, &Arc::default());
        ps.subscribe("a", &[f("config/#", 1)]);
        let got = ps.take("a", 10);
        assert_eq!(got.len(), 1);
        assert!(got[0].retain);
        ps.publish(b("config/d1"), Bytes::new(), 1, true);
        ps.open("b", false, &Arc::default());
        ps.subscribe("b", &[f("config/#", 0)]);
        assert!(ps.take("b", 10).is_empty());
    }

    #[test]
    fn a_persistent_session_keeps_messages_and_unacked_ones_while_offline() {
        let ps = PubSub::default();
        let first = ps.open("p", true, &Arc::default());
        ps.subscribe("p", &[f("t/#", 1)]);
        ps.publish(b("t/1"), b("one"), 1, false);
        let sent = ps.take("p", 10);
        // The connection ends before the PUBACK; a message arrives while offline.
        ps.close("p", first.generation, sent);
        ps.publish(b("t/2"), b("two"), 1, false);
        let again = ps.open("p", true, &Arc::default());
        assert!(again.present);
        let got = ps.take("p", 10);
        assert_eq!(got.len(), 2);
        assert!(got[0].dup && &got[0].payload[..] == b"one");
        assert!(!got[1].dup && &got[1].payload[..] == b"two");
        // A clean connection discards the session.
        let clean = ps.open("p", false, &Arc::default());
        assert!(!clean.present);
        ps.publish(b("t/3"), b("three"), 1, false);
        assert!(ps.take("p", 10).is_empty());
    }

    #[test]
    fn a_full_queue_drops_its_oldest() {
        let ps = PubSub::default();
        ps.open("slow", true, &Arc::default());
        ps.subscribe("slow", &[f("#", 0)]);
        for _ in 0..SESSION_QUEUE + 5 {
            ps.publish(b("t"), b("x"), 0, false);
        }
        assert_eq!(ps.take("slow", usize::MAX).len(), SESSION_QUEUE);
    }

    #[test]
    fn retained_messages_and_offline_sessions_are_bounded() {
        let ps = PubSub::new(Bounds {
            max_retained: 2,
            max_retained_bytes: 100,
            max_offline_sessions: 1,
            session_expiry: std::time::Duration::from_secs(3600),
        });
        ps.publish(b("r/1"), b("a"), 0, true);
        ps.publish(b("r/2"), b("b"), 0, true);
        ps.publish(b("r/3"), b("c"), 0, true); // third: over the count, not retained
        ps.publish(b("r/1"), b("a2"), 0, true); // replacing one is fine
        ps.publish(b("r/2"), Bytes::from(vec![b'x'; 200]), 0, true); // over the bytes: kept old
        ps.open("s", false, &Arc::default());
        ps.subscribe("s", &[f("r/#", 0)]);
        let mut got: Vec<_> = ps
            .take("s", 10)
            .into_iter()
            .map(|d| (d.topic, d.payload))
            .collect();
        got.sort();
        assert_eq!(got, [(b("r/1"), b("a2")), (b("r/2"), b("b"))]);
        // Two persistent sessions go offline; only the newest is kept.
        let one = ps.open("p1", true, &Arc::default());
        ps.close("p1", one.generation, Vec::new());
        let two = ps.open("p2", true, &Arc::default());
        ps.close("p2", two.generation, Vec::new());
        assert!(!ps.open("p1", true, &Arc::default()).present);
        assert!(ps.open("p2", true, &Arc::default()).present);
    }

    #[tokio::test]
    async fn committed_messages_are_fanned_out_by_the_task_in_order_within_a_bounded_queue() {
        let ps = Arc::new(PubSub::default());
        // Nobody subscribes: nothing is queued, but a retained message is kept at once.
        ps.committed(b("cfg/a"), b("v1"), 1, true);
        assert_eq!(ps.queue.lock().unwrap().messages.len(), 0);
        ps.open("s", false, &Arc::default());
        ps.subscribe("s", &[f("t/#", 1), f("cfg/+", 0)]);
        assert_eq!(
            ps.take("s", 10).len(),
            1,
            "the retained one, on subscribing"
        );
        // The task is not running yet: the queue fills up to its bound, then drops.
        let big = Bytes::from(vec![b'x'; 1 << 20]);
        for _ in 0..17 {
            ps.committed(b("t/big"), big.clone(), 1, false);
        }
        let queued = ps.queue.lock().unwrap().messages.len();
        assert_eq!(queued, 15, "16 MiB of topic + payload");
        ps.committed(b("cfg/a"), b("v2"), 1, true); // retained even with the queue full
        let task = tokio::spawn({
            let ps = Arc::clone(&ps);
            async move { ps.run_fanout().await }
        });
        let mut got = Vec::new();
        while got.len() < 16 {
            got.extend(ps.take("s", 100));
            tokio::task::yield_now().await;
        }
        let (big, small): (Vec<_>, Vec<_>) = got.iter().partition(|d| d.topic == b("t/big"));
        assert_eq!(big.len(), 15);
        // The small one still fitted; the subscriber's `cfg/+` was granted QoS 0.
        assert_eq!((&small[0].payload, small[0].qos), (&b("v2"), 0));
        // Once there is room, messages flow again, in commit order.
        for p in ["1", "2", "3"] {
            ps.committed(b("t/n"), Bytes::from(p), 1, false);
        }
        let mut order = Vec::new();
        while order.len() < 3 {
            order.extend(ps.take("s", 100).into_iter().map(|d| d.payload));
            tokio::task::yield_now().await;
        }
        assert_eq!(order, [b("1"), b("2"), b("3")]);
        task.abort();
        ps.open("late", false, &Arc::default());
        ps.subscribe("late", &[f("cfg/a", 1)]);
        assert_eq!(ps.take("late", 10)[0].payload, b("v2"));
    }

    #[test]
    fn replaced_and_expired_sessions_leave_the_index() {
        let ps = PubSub::new(Bounds {
            session_expiry: std::time::Duration::ZERO,
            ..Bounds::default()
        });
        let one = ps.open("p", true, &Arc::default());
        ps.subscribe("p", &[f("a/#", 1), f("b", 1)]);
        assert_eq!(ps.lock().index.len(), 2);
        ps.open("p", false, &Arc::default()); // a clean start replaces the session
        assert_eq!(ps.lock().index.len(), 0);
        assert!(!ps.wants(false));
        ps.subscribe("p", &[f("a/#", 1)]);
        let two = ps.open("q", true, &Arc::default());
        ps.subscribe("q", &[f("a/#", 0)]);
        ps.close("q", two.generation, Vec::new()); // offline, expires at the next sweep
        ps.close("p", one.generation + 1, Vec::new());
        let _ = ps.open("r", false, &Arc::default());
        assert_eq!(ps.lock().index.len(), 0);
    }

    /// Saves `ps`'s changes into `conn` and restores what the file holds into a new PubSub.
    fn save_and_restart(ps: &PubSub, conn: &rusqlite::Connection) -> PubSub {
        crate::buffer::sessions::save(conn, &ps.changes()).unwrap();
        let restarted = PubSub::default();
        restarted.restore(crate::buffer::sessions::load(conn).unwrap());
        restarted
    }

    #[test]
    fn persistent_sessions_and_retained_messages_survive_a_restart() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch(crate::buffer::sessions::SCHEMA).unwrap();
        let ps = PubSub::default();
        ps.publish(b("cfg/d1"), b("v1"), 1, true);
        ps.open("p", true, &Arc::default());
        ps.subscribe("p", &[f("t/#", 1), f("q0/#", 0)]);
        ps.open("clean", false, &Arc::default());
        ps.subscribe("clean", &[f("t/#", 1)]);
        for m in ["1", "2", "3"] {
            ps.publish(b("t/x"), Bytes::from(m), 1, false);
        }
        ps.publish(b("q0/x"), b("qos0"), 1, false);
        // The device takes three; acknowledges "1"; "2" stays in flight; a crash.
        let taken = ps.take("p", 3);
        assert_eq!(taken.len(), 3);
        ps.acked("p", taken[0].seq);
        let restarted = save_and_restart(&ps, &conn);
        let again = restarted.open("p", true, &Arc::default());
        assert!(again.present, "the persistent session came back");
        let got = restarted.take("p", 10);
        // In flight and queued QoS 1 messages, in order; QoS 0 ones are not kept.
        let payloads: Vec<_> = got.iter().map(|d| d.payload.clone()).collect();
        assert_eq!(payloads, [b("2"), b("3")]);
        assert!(
            !restarted.open("clean", true, &Arc::default()).present,
            "clean sessions are not kept"
        );
        // Filters came back: new messages reach the session.
        restarted.publish(b("t/y"), b("4"), 1, false);
        let four = restarted.take("p", 10);
        assert_eq!(four[0].payload, b("4"));
        for d in got.iter().chain(&four) {
            restarted.acked("p", d.seq);
        }
        restarted.open("late", false, &Arc::default());
        restarted.subscribe("late", &[f("cfg/#", 1)]);
        assert_eq!(restarted.take("late", 10)[0].payload, b("v1"));

        // Incremental saves: acknowledge, unsubscribe, clear the retained message, end the
        // session; each is saved.
        let ps = restarted;
        let conn2 = rusqlite::Connection::open_in_memory().unwrap();
        conn2
            .execute_batch(crate::buffer::sessions::SCHEMA)
            .unwrap();
        crate::buffer::sessions::save(&conn2, &ps.changes()).unwrap();
        ps.unsubscribe("p", &["t/#".into()]);
        ps.publish(b("cfg/d1"), Bytes::new(), 1, true);
        let after = save_and_restart(&ps, &conn2);
        after.publish(b("t/z"), b("5"), 1, false);
        assert!(after.open("p", true, &Arc::default()).present);
        assert!(
            after.take("p", 10).is_empty(),
            "unsubscribed, and nothing left queued"
        );
        after.open("late2", false, &Arc::default());
        after.subscribe("late2", &[f("cfg/#", 1)]);
        assert!(
            after.take("late2", 10).is_empty(),
            "the retained message was cleared"
        );
        after.open("p", false, &Arc::default()); // a clean start ends the persistent session
        let last = save_and_restart(&after, &conn2);
        assert!(!last.open("p", true, &Arc::default()).present);
    }

    #[test]
    fn an_unacknowledged_message_put_back_is_saved_with_its_dup_flag() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch(crate::buffer::sessions::SCHEMA).unwrap();
        let ps = PubSub::default();
        let one = ps.open("p", true, &Arc::default());
        ps.subscribe("p", &[f("t", 1)]);
        ps.publish(b("t"), b("a"), 1, false);
        crate::buffer::sessions::save(&conn, &ps.changes()).unwrap();
        let sent = ps.take("p", 10);
        ps.close("p", one.generation, sent);
        let restarted = save_and_restart(&ps, &conn);
        restarted.open("p", true, &Arc::default());
        let got = restarted.take("p", 10);
        assert_eq!(got.len(), 1);
        assert!(got[0].dup);
    }

    #[test]
    fn offline_sessions_expire() {
        let ps = PubSub::new(Bounds {
            session_expiry: std::time::Duration::ZERO,
            ..Bounds::default()
        });
        let one = ps.open("p", true, &Arc::default());
        ps.close("p", one.generation, Vec::new());
        assert!(!ps.open("p", true, &Arc::default()).present);
    }
}
