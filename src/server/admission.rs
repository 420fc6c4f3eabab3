//! Who may hold an unauthenticated slot, and for how long (spec 13.10).
//!
//! Before a peer has proven anything it is a stranger, and the daemon has a bounded
//! pool of slots for strangers (`limits.max_unauthenticated`). The defences:
//!
//! - **The newcomer is never the one refused when the pool is full.** Refusing newcomers
//!   hands the port to whoever fills the pool first (a few hundred idle sockets locked
//!   every device out). Instead the daemon evicts from *the source that holds the most
//!   slots its oldest connection that has not completed a frame (else its oldest)*;
//!   among sources holding as many, the oldest such connection. Oldest rather than
//!   random: a
//!   device sends its first frame one round trip after connecting, so among frameless
//!   connections the old ones are the ones that are not going to, and a legitimate
//!   handshake, young by nature, is the last to go; a random choice would hit
//!   in-progress handshakes in proportion to their share of the pool. The heaviest
//!   source first: attackers that churn connections fast enough that even a young one
//!   is the oldest frameless, or that send a HELLO and then hold the connection, still
//!   do not get a device's connection (one slot from its address) closed while any
//!   source holds more. Devices behind one NAT share a source, and so share its fate.
//! - **Per-source caps**: one source (an IPv4 address, or an IPv6 /64, which one
//!   subscriber typically holds whole) may hold at most `max_unauthenticated_per_source`
//!   slots; beyond that its own oldest frameless connection makes room, or, if it has
//!   none, its newcomer is closed. So one address cannot take the pool.
//! - **A token bucket per source** on new connections (`new_connections_per_source`
//!   per second, bursts of twice that): devices behind one NAT share it, so the default
//!   admits several hundred handshakes per second from one address.
//!
//! Deadlines (the first frame within `first_frame_timeout`, the rest of the handshake
//! within `handshake_timeout`) are applied by the connection task; a slot is returned
//! before any linger. Refusals are counted here too, so that a flood is one log line per
//! interval, not one per connection ([`RefusalLog`]).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Where a connection comes from, for per-source limits: an IPv4 address (IPv4-mapped
/// IPv6 included), or the /64 of an IPv6 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// An IPv4 address.
    V4([u8; 4]),
    /// The first 64 bits of an IPv6 address.
    V6([u8; 8]),
}

impl Source {
    /// The source of a peer address.
    pub fn of(peer: &SocketAddr) -> Source {
        match peer.ip() {
            IpAddr::V4(a) => Source::V4(a.octets()),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.octets()),
                None => Source::V6(a.octets()[..8].try_into().expect("8 bytes")),
            },
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::V4(a) => write!(f, "{}", std::net::Ipv4Addr::from(*a)),
            Source::V6(p) => {
                let mut full = [0u8; 16];
                full[..8].copy_from_slice(p);
                write!(f, "{}/64", std::net::Ipv6Addr::from(full))
            }
        }
    }
}

/// The admission limits (from `[limits]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionLimits {
    /// Unauthenticated connections at once, all sources together.
    pub max_unauthenticated: usize,
    /// Unauthenticated connections at once from one source.
    pub per_source: usize,
    /// New connections per second from one source (the bucket holds twice this).
    pub rate: f64,
}

impl From<&crate::config::Limits> for AdmissionLimits {
    fn from(l: &crate::config::Limits) -> Self {
        AdmissionLimits {
            max_unauthenticated: l.max_unauthenticated,
            per_source: l.max_unauthenticated_per_source,
            rate: f64::from(l.new_connections_per_source),
        }
    }
}

/// Why a new connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotAdmitted {
    /// The source opened connections faster than its rate.
    Rate,
    /// The source holds its cap of unauthenticated connections, all past their first
    /// frame.
    SourceFull,
}

impl NotAdmitted {
    /// A short name, for the summaries.
    pub fn kind(self) -> &'static str {
        match self {
            NotAdmitted::Rate => "source over its connection rate",
            NotAdmitted::SourceFull => "source over its cap",
        }
    }

    /// The reason, for logs.
    pub fn reason(self) -> &'static str {
        match self {
            NotAdmitted::Rate => {
                "connection rate of its source over limits.new_connections_per_source"
            }
            NotAdmitted::SourceFull => {
                "its source holds limits.max_unauthenticated_per_source handshakes in progress"
            }
        }
    }
}

struct Slot {
    source: Source,
    framed: bool,
    evict: CancellationToken,
}

struct SourceState {
    /// Its unauthenticated connections that have not completed a frame, oldest first.
    frameless: BTreeSet<u64>,
    /// And those that have.
    framed: BTreeSet<u64>,
    bucket: TokenBucket,
}

impl SourceState {
    fn held(&self) -> usize {
        self.frameless.len() + self.framed.len()
    }

    /// Its connection to close if it is the source to evict from: the oldest that has
    /// not completed a frame, else the oldest.
    fn candidate(&self) -> Option<u64> {
        self.frameless.first().or(self.framed.first()).copied()
    }

    /// Its place in [`Inner::ranked`], if it holds anything.
    fn rank(&self, source: Source) -> Option<Rank> {
        let candidate = self.candidate()?;
        Some((self.held(), Reverse(candidate), source))
    }
}

/// (slots held, the candidate, reversed so that the older is greater, the source): the
/// greatest is the source to evict from.
type Rank = (usize, Reverse<u64>, Source);

/// A token bucket: `rate` tokens per second, holding at most twice that (at least one).
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(rate: f64, now: Instant) -> Self {
        TokenBucket {
            tokens: Self::capacity(rate),
            refilled: now,
        }
    }

    fn capacity(rate: f64) -> f64 {
        (2.0 * rate).max(1.0)
    }

    /// Refills for the time since the last call, then takes a token if there is one.
    pub fn take(&mut self, rate: f64, now: Instant) -> bool {
        if !self.has_token(rate, now) {
            return false;
        }
        self.tokens -= 1.0;
        true
    }

    /// Refills for the time since the last call; whether a token is there (none taken).
    pub fn has_token(&mut self, rate: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(Self::capacity(rate));
        self.refilled = self.refilled.max(now);
        self.tokens >= 1.0
    }

    /// Whether it has been untouched long enough to be full again.
    fn full_by(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.refilled) >= Duration::from_secs(2)
    }
}

struct Inner {
    limits: AdmissionLimits,
    next: u64,
    /// Unauthenticated connections, by id (ids grow with admission: smaller is older).
    slots: HashMap<u64, Slot>,
    sources: HashMap<Source, SourceState>,
    /// The sources that hold at least one slot, ordered for eviction (see [`Rank`]): a
    /// choice in O(log n) per admission, however many sources and slots there are (a scan
    /// of them cost the accept loop a quarter of its time under a 200-address flood).
    ranked: BTreeSet<Rank>,
    /// When the source table was last pruned.
    pruned: Instant,
}

impl Inner {
    /// Applies `change` to the slots of `source`, keeping [`Inner::ranked`] in step.
    fn update(&mut self, source: Source, change: impl FnOnce(&mut SourceState)) {
        let Some(s) = self.sources.get_mut(&source) else {
            return;
        };
        if let Some(rank) = s.rank(source) {
            self.ranked.remove(&rank);
        }
        change(s);
        if let Some(rank) = s.rank(source) {
            self.ranked.insert(rank);
        }
    }

    fn evict(&mut self, id: u64) {
        if let Some(slot) = self.remove(id) {
            slot.evict.cancel();
        }
    }

    fn remove(&mut self, id: u64) -> Option<Slot> {
        let slot = self.slots.remove(&id)?;
        self.update(slot.source, |s| {
            s.frameless.remove(&id);
            s.framed.remove(&id);
        });
        Some(slot)
    }

    fn mark_framed(&mut self, id: u64) {
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        if std::mem::replace(&mut slot.framed, true) {
            return;
        }
        let source = slot.source;
        self.update(source, |s| {
            s.frameless.remove(&id);
            s.framed.insert(id);
        });
    }

    /// The oldest connection of `source` that has not completed a frame.
    fn oldest_frameless(&self, source: &Source) -> Option<u64> {
        self.sources.get(source)?.frameless.first().copied()
    }

    /// The connection to close when the pool is full (see the module docs): from the
    /// source holding the most slots, its oldest connection that has not completed a
    /// frame, or else its oldest; among sources holding as many, the oldest candidate.
    /// (Not "frameless first" across sources: attackers with one HELLO'd connection per
    /// address would then make every device's young, frameless connection the victim.)
    fn victim(&self) -> Option<u64> {
        self.ranked.last().map(|&(_, Reverse(id), _)| id)
    }

    /// Forgets sources that hold nothing and whose bucket is full again, once there are
    /// many, at most once a second (a scan per accept would cost the accept loop more
    /// the more addresses attack): the table stays bounded by the sources active in the
    /// last few seconds.
    fn prune(&mut self, now: Instant) {
        if self.sources.len() <= 4 * self.limits.max_unauthenticated + 1024
            || now.saturating_duration_since(self.pruned) < Duration::from_secs(1)
        {
            return;
        }
        self.pruned = now;
        self.sources
            .retain(|_, s| s.held() > 0 || !s.bucket.full_by(now));
    }
}

/// The pool of unauthenticated slots.
pub struct Admission {
    inner: Mutex<Inner>,
}

impl Admission {
    /// An empty pool.
    pub fn new(limits: AdmissionLimits) -> Self {
        Admission {
            inner: Mutex::new(Inner {
                limits,
                next: 0,
                slots: HashMap::new(),
                sources: HashMap::new(),
                ranked: BTreeSet::new(),
                pruned: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// New limits (configuration reload). A smaller pool or cap is reached through
    /// evictions as new connections arrive, one or more per admission.
    pub fn set_limits(&self, limits: AdmissionLimits) {
        self.lock().limits = limits;
    }

    /// Unauthenticated connections held now.
    pub fn len(&self) -> usize {
        self.lock().slots.len()
    }

    /// Admits a new connection from `peer` at `now`, evicting another if a pool is full.
    /// Returns the slot, and the source of the connection evicted to make room, if any.
    pub fn admit(
        self: &Arc<Self>,
        peer: &SocketAddr,
        now: Instant,
    ) -> Result<(Ticket, Option<Source>), NotAdmitted> {
        let source = Source::of(peer);
        let mut inner = self.lock();
        inner.prune(now);
        let limits = inner.limits;
        let state = inner.sources.entry(source).or_insert(SourceState {
            frameless: BTreeSet::new(),
            framed: BTreeSet::new(),
            bucket: TokenBucket::full(limits.rate, now),
        });
        if !state.bucket.take(limits.rate, now) {
            return Err(NotAdmitted::Rate);
        }
        let mut evicted = None;
        if state.held() >= limits.per_source {
            let victim = inner
                .oldest_frameless(&source)
                .ok_or(NotAdmitted::SourceFull)?;
            inner.evict(victim);
            evicted = Some(source);
        }
        while inner.slots.len() >= limits.max_unauthenticated {
            let Some(victim) = inner.victim() else { break };
            let from = inner.slots[&victim].source;
            inner.evict(victim);
            evicted = Some(from);
        }
        let id = inner.next;
        inner.next += 1;
        let evict = CancellationToken::new();
        inner.slots.insert(
            id,
            Slot {
                source,
                framed: false,
                evict: evict.clone(),
            },
        );
        inner.update(source, |s| {
            s.frameless.insert(id);
        });
        Ok((
            Ticket {
                pool: self.clone(),
                id,
                evict,
            },
            evicted,
        ))
    }
}

/// An unauthenticated slot; returned when dropped.
pub struct Ticket {
    pool: Arc<Admission>,
    id: u64,
    evict: CancellationToken,
}

impl Ticket {
    /// The connection completed its first frame: it is no longer first in line to go.
    pub fn framed(&self) {
        self.pool.lock().mark_framed(self.id);
    }

    /// Completes when the slot was given to a newer connection.
    pub async fn evicted(&self) {
        self.evict.cancelled().await
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.pool.lock().remove(self.id);
    }
}

/// Counts refusals of unauthenticated connections: the first few of each interval are
/// logged in full, the rest in one summary line per interval (a flood of junk must not
/// turn into a flood of journal lines).
pub struct RefusalLog {
    inner: Mutex<LogInner>,
}

#[derive(Default)]
struct LogInner {
    logged: u32,
    reasons: BTreeMap<&'static str, u64>,
    sources: HashMap<Source, u64>,
}

/// What [`RefusalLog::summary`] reports.
#[derive(Debug, PartialEq)]
pub struct Summary {
    /// Refusals in the interval.
    pub total: u64,
    /// Of which not logged one by one.
    pub unlogged: u64,
    /// Count per kind, most frequent first.
    pub reasons: Vec<(&'static str, u64)>,
    /// The sources with the most refusals, most first (at most five).
    pub top_sources: Vec<(Source, u64)>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |v: Vec<String>| v.join(", ");
        write!(
            f,
            "{} unauthenticated connections refused ({} not logged one by one): {}; top sources: {}",
            self.total,
            self.unlogged,
            join(self.reasons.iter().map(|(r, n)| format!("{r} {n}")).collect()),
            join(self.top_sources.iter().map(|(s, n)| format!("{s} {n}")).collect()),
        )
    }
}

impl RefusalLog {
    /// Refusals logged in full per interval.
    pub const FULL_PER_INTERVAL: u32 = 10;
    /// The interval of summaries.
    pub const INTERVAL: Duration = Duration::from_secs(10);

    /// An empty log.
    pub fn new() -> Self {
        RefusalLog {
            inner: Mutex::new(LogInner::default()),
        }
    }

    /// Counts a refusal of kind `kind` from `source`; true if it should be logged in
    /// full.
    pub fn note(&self, kind: &'static str, source: Source) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        *inner.reasons.entry(kind).or_default() += 1;
        // Bounded: under a flood from many addresses, the table keeps the first ones.
        if inner.sources.len() < 10_000 || inner.sources.contains_key(&source) {
            *inner.sources.entry(source).or_default() += 1;
        }
        inner.logged += 1;
        inner.logged <= Self::FULL_PER_INTERVAL
    }

    /// Ends the interval: the summary of its refusals, if some were not logged in full.
    pub fn summary(&self) -> Option<Summary> {
        let inner = std::mem::take(&mut *self.inner.lock().unwrap_or_else(|e| e.into_inner()));
        let total: u64 = inner.reasons.values().sum();
        let unlogged = total.saturating_sub(Self::FULL_PER_INTERVAL as u64);
        if unlogged == 0 {
            return None;
        }
        let mut reasons: Vec<_> = inner.reasons.into_iter().collect();
        reasons.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let mut top_sources: Vec<_> = inner.sources.into_iter().collect();
        top_sources.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        top_sources.truncate(5);
        Some(Summary {
            total,
            unlogged,
            reasons,
            top_sources,
        })
    }
}

impl Default for RefusalLog {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_source: usize, rate: f64) -> AdmissionLimits {
        AdmissionLimits {
            max_unauthenticated: max,
            per_source,
            rate,
        }
    }

    fn peer(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_slash_64s() {
        assert_eq!(Source::of(&peer("10.1.2.3:5")), Source::V4([10, 1, 2, 3]));
        assert_eq!(
            Source::of(&peer("[::ffff:10.1.2.3]:5")),
            Source::V4([10, 1, 2, 3])
        );
        let a = Source::of(&peer("[2001:db8:1:2:aaaa::1]:5"));
        assert_eq!(a, Source::of(&peer("[2001:db8:1:2:bbbb::9]:7")));
        assert_ne!(a, Source::of(&peer("[2001:db8:1:3::1]:5")));
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
    }

    /// The eviction rule computed the slow way, from the slots alone.
    fn victim_by_scan(inner: &Inner) -> Option<u64> {
        let mut by_source: HashMap<Source, Vec<(u64, bool)>> = HashMap::new();
        for (&id, slot) in &inner.slots {
            by_source
                .entry(slot.source)
                .or_default()
                .push((id, slot.framed));
        }
        by_source
            .values()
            .map(|slots| {
                let oldest_frameless = slots.iter().filter(|s| !s.1).map(|s| s.0).min();
                let oldest = slots.iter().map(|s| s.0).min().unwrap();
                (slots.len(), Reverse(oldest_frameless.unwrap_or(oldest)))
            })
            .max()
            .map(|(_, Reverse(id))| id)
    }

    #[test]
    fn the_ranked_victim_is_the_one_the_rule_names_after_any_sequence() {
        let pool = Arc::new(Admission::new(limits(40, 12, 1e9)));
        let t = Instant::now();
        let mut held: Vec<Ticket> = Vec::new();
        // A fixed xorshift sequence: admissions from 9 sources, frames, drops.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for step in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match x % 5 {
                0 | 1 => {
                    let p = peer(&format!("10.0.0.{}:1", x % 9));
                    if let Ok((ticket, _)) = pool.admit(&p, t) {
                        held.push(ticket);
                    }
                }
                2 if !held.is_empty() => held[(x >> 8) as usize % held.len()].framed(),
                3 if !held.is_empty() => drop(held.swap_remove((x >> 8) as usize % held.len())),
                _ => {}
            }
            held.retain(|ticket| !ticket.evict.is_cancelled());
            let inner = pool.lock();
            assert_eq!(inner.victim(), victim_by_scan(&inner), "step {step}");
            assert_eq!(inner.slots.len(), held.len());
            assert!(inner.slots.len() <= 40);
            let ranked: usize = inner.ranked.iter().map(|r| r.0).sum();
            assert_eq!(ranked, held.len(), "every held slot is ranked once");
        }
    }

    #[test]
    fn a_full_pool_evicts_the_oldest_connection_not_the_newcomer() {
        let pool = Arc::new(Admission::new(limits(3, 10, 1000.0)));
        let t = Instant::now();
        let (a, _) = pool.admit(&peer("10.0.0.1:1"), t).unwrap();
        let (b, _) = pool.admit(&peer("10.0.0.2:1"), t).unwrap();
        let (c, _) = pool.admit(&peer("10.0.0.3:1"), t).unwrap();
        a.framed();
        // One slot per source: the oldest goes, framed or not (a HELLO then silence
        // holds a slot as well as silence does).
        let (d, evicted) = pool.admit(&peer("10.0.0.4:1"), t).unwrap();
        assert_eq!(evicted, Some(Source::V4([10, 0, 0, 1])));
        assert!(a.evict.is_cancelled());
        assert!(!b.evict.is_cancelled() && !c.evict.is_cancelled());
        assert_eq!(pool.len(), 3);
        drop(a); // the evicted connection's task ends: nothing more is removed
        assert_eq!(pool.len(), 3);
        // Within a source, a frameless connection goes before an older framed one.
        let (x1, _) = pool.admit(&peer("10.0.0.9:1"), t).unwrap(); // evicts b
        x1.framed();
        let (x2, _) = pool.admit(&peer("10.0.0.9:2"), t).unwrap(); // evicts c
        assert!(b.evict.is_cancelled() && c.evict.is_cancelled());
        let (_y, evicted) = pool.admit(&peer("10.0.0.5:1"), t).unwrap();
        assert_eq!(evicted, Some(Source::V4([10, 0, 0, 9])));
        assert!(x2.evict.is_cancelled() && !x1.evict.is_cancelled());
        assert!(!d.evict.is_cancelled());
    }

    #[test]
    fn the_heaviest_source_makes_room_first() {
        let pool = Arc::new(Admission::new(limits(4, 10, 1000.0)));
        let t = Instant::now();
        let (device, _) = pool.admit(&peer("10.0.0.9:1"), t).unwrap(); // oldest
        let attacker: Vec<_> = (0..3)
            .map(|i| pool.admit(&peer(&format!("10.6.6.6:{i}")), t).unwrap().0)
            .collect();
        let (_new, evicted) = pool.admit(&peer("10.0.0.8:1"), t).unwrap();
        assert_eq!(evicted, Some(Source::V4([10, 6, 6, 6])));
        assert!(attacker[0].evict.is_cancelled(), "the attacker's oldest");
        assert!(
            !device.evict.is_cancelled(),
            "not the older device, alone at its address"
        );
    }

    #[test]
    fn one_source_cannot_hold_more_than_its_cap() {
        let pool = Arc::new(Admission::new(limits(100, 2, 1000.0)));
        let t = Instant::now();
        let (a, _) = pool.admit(&peer("10.0.0.1:1"), t).unwrap();
        let (b, _) = pool.admit(&peer("10.0.0.1:2"), t).unwrap();
        // A third from the same address replaces its own oldest frameless one...
        let (_c, evicted) = pool.admit(&peer("10.0.0.1:3"), t).unwrap();
        assert_eq!(evicted, Some(Source::V4([10, 0, 0, 1])));
        assert!(a.evict.is_cancelled());
        drop(a);
        // ...and when all of its connections are past their first frame, it is refused.
        b.framed();
        _c.framed();
        assert_eq!(
            pool.admit(&peer("10.0.0.1:4"), t).err(),
            Some(NotAdmitted::SourceFull)
        );
        // Other sources are not affected.
        assert!(pool.admit(&peer("10.0.0.9:1"), t).is_ok());
    }

    #[test]
    fn the_rate_per_source_is_a_token_bucket() {
        let pool = Arc::new(Admission::new(limits(10_000, 10_000, 100.0)));
        let t = Instant::now();
        // A burst of twice the rate is admitted, then refused...
        let held: Vec<_> = (0..200)
            .map(|i| pool.admit(&peer(&format!("10.0.0.1:{i}")), t).unwrap())
            .collect();
        assert_eq!(
            pool.admit(&peer("10.0.0.1:999"), t).err(),
            Some(NotAdmitted::Rate)
        );
        assert!(pool.admit(&peer("10.0.0.2:1"), t).is_ok());
        // ...and the bucket refills at the rate: 10 ms later, one more.
        let later = t + Duration::from_millis(10);
        assert!(pool.admit(&peer("10.0.0.1:1000"), later).is_ok());
        assert_eq!(
            pool.admit(&peer("10.0.0.1:1001"), later).err(),
            Some(NotAdmitted::Rate)
        );
        drop(held);
        assert_eq!(
            pool.len(),
            0,
            "every slot is returned when its ticket drops"
        );
    }

    #[test]
    fn the_source_table_stays_bounded() {
        let pool = Arc::new(Admission::new(limits(1, 1, 10.0)));
        let t = Instant::now();
        for i in 0..5000u32 {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            drop(pool.admit(&SocketAddr::new(ip.into(), 1), t).unwrap());
        }
        let later = t + Duration::from_secs(3);
        drop(pool.admit(&peer("10.9.9.9:1"), later).unwrap());
        assert!(pool.lock().sources.len() <= 4 + 1024 + 1);
    }

    #[test]
    fn refusals_beyond_the_first_few_are_summarised() {
        let log = RefusalLog::new();
        let a = Source::V4([10, 0, 0, 1]);
        let b = Source::V4([10, 0, 0, 2]);
        let full: u32 = (0..25)
            .map(|i| log.note("first-frame deadline", if i < 20 { a } else { b }) as u32)
            .sum();
        assert_eq!(full, RefusalLog::FULL_PER_INTERVAL);
        log.note("evicted", b);
        let s = log.summary().unwrap();
        assert_eq!(s.total, 26);
        assert_eq!(s.unlogged, 16);
        assert_eq!(
            s.reasons,
            vec![("first-frame deadline", 25), ("evicted", 1)]
        );
        assert_eq!(s.top_sources, vec![(a, 20), (b, 6)]);
        assert!(s
            .to_string()
            .contains("top sources: 10.0.0.1 20, 10.0.0.2 6"));
        // A new interval starts empty; a quiet one has no summary.
        log.note("evicted", a);
        assert_eq!(log.summary(), None);
    }
}
