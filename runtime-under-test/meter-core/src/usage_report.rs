//! Usage reports from a usage log: usage time per user and product, peak concurrent grants per
//! hour, denials per hour and reason, and the time reserved seats stood unused.
//!
//! The log is replayed from its first record (grants made before the window still count in it);
//! only what falls inside the window `[from, to)` is reported. A grant still held at `to` counts
//! up to `to`. Reservations are those of the rules document given (the rules in force now), each
//! counting the grants its subject holds.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::access_rules::{AccessRules, Requester, Subject};
use crate::allocation::ProductKey;
use crate::reason::Reason;
use crate::usage::{UsageEvent, UsageKind};

/// One hour in ms.
pub const HOUR_MS: u64 = 3_600_000;

/// Most hours one product's peaks are filled across a gap with no event.
const MAX_FILLED_HOURS: u64 = 24 * 400;

/// A usage report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct UsageReport {
    /// Start of the window, unix ms.
    pub from_ms: u64,
    /// End of the window (excluded), unix ms.
    pub to_ms: u64,
    /// Records read.
    pub records: u64,
    /// Usage per product and user.
    pub usage: Vec<UserUsage>,
    /// Most grants of a product held at once, per hour.
    pub peaks: Vec<HourPeak>,
    /// Denials per hour, product, user and reason.
    pub denials: Vec<DenialCount>,
    /// Reserved seats and how long they stood unused.
    pub reserved_unused: Vec<ReserveUse>,
}

/// How much one user used one product.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct UserUsage {
    /// The product.
    pub product: ProductKey,
    /// The user (none: not known).
    pub user: Option<String>,
    /// Grants made in the window.
    pub grants: u64,
    /// Time held within the window, summed over the user's grants, ms.
    pub held_ms: u64,
}

/// The peak of one product in one hour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct HourPeak {
    /// The product.
    pub product: ProductKey,
    /// Start of the hour, unix ms.
    pub hour_ms: u64,
    /// Most grants held at once.
    pub peak: u32,
}

/// Denials alike within one hour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DenialCount {
    /// Start of the hour, unix ms.
    pub hour_ms: u64,
    /// The product.
    pub product: ProductKey,
    /// The user refused (none: not known).
    pub user: Option<String>,
    /// Why.
    pub reason: Reason,
    /// The rule that refused, by index.
    pub rule: Option<u32>,
    /// How many.
    pub count: u64,
}

/// One reservation and its unused time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ReserveUse {
    /// The product.
    pub product: ProductKey,
    /// The rule's index in the rules document.
    pub rule: usize,
    /// Whom it reserves for.
    pub who: String,
    /// Seats reserved.
    pub reserved: u32,
    /// Seat time reserved and not used within the window, ms (two idle seats for an hour: two
    /// hours).
    pub unused_ms: u64,
}

/// The window a report covers: from (default: the first record) to (excluded).
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Start, unix ms.
    pub from_ms: Option<u64>,
    /// End, unix ms.
    pub to_ms: u64,
}

/// Denials alike: hour, product, user, reason and rule.
type DenialKey = (u64, ProductKey, Option<String>, Reason, Option<u32>);

struct Live {
    product: ProductKey,
    user: Option<String>,
    start_ms: u64,
    /// Indexes (in `reserves`) of the reservations whose subject holds it.
    reserves: Vec<usize>,
}

struct Reserve {
    rule: crate::access_rules::Rule,
    product: ProductKey,
    index: usize,
    who: Subject,
    reserved: u32,
    held: u32,
    unused_ms: u64,
}

/// Builds a report from the events of a log, in log order.
pub fn build(
    events: impl IntoIterator<Item = UsageEvent>,
    rules: Option<&AccessRules>,
    window: Window,
) -> UsageReport {
    let mut builder = Builder::new(rules, window);
    for event in events {
        builder.add(&event);
    }
    builder.finish()
}

/// A report built one event at a time.
pub struct Builder<'r> {
    rules: Option<&'r AccessRules>,
    window: Window,
    from_ms: Option<u64>,
    records: u64,
    live: HashMap<(ProductKey, u64), Live>,
    level: HashMap<ProductKey, (u32, u64)>,
    usage: BTreeMap<(ProductKey, Option<String>), (u64, u64)>,
    peaks: BTreeMap<(ProductKey, u64), u32>,
    denials: BTreeMap<DenialKey, u64>,
    reserves: Vec<Reserve>,
    last_ms: Option<u64>,
}

impl<'r> Builder<'r> {
    /// A report over `window`, reservations from `rules`.
    pub fn new(rules: Option<&'r AccessRules>, window: Window) -> Self {
        let reserves = rules
            .into_iter()
            .flat_map(|r| r.rules.iter().enumerate())
            .filter_map(|(index, rule)| {
                Some(Reserve {
                    rule: rule.clone(),
                    product: ProductKey {
                        firm: rule.firm.unwrap_or(crate::policy::DEFAULT_FIRM),
                        code: rule.product?,
                    },
                    index,
                    who: rule.who.clone(),
                    reserved: rule.reserve?,
                    held: 0,
                    unused_ms: 0,
                })
            })
            .collect();
        Builder {
            rules,
            window,
            from_ms: window.from_ms,
            records: 0,
            live: HashMap::new(),
            level: HashMap::new(),
            usage: BTreeMap::new(),
            peaks: BTreeMap::new(),
            denials: BTreeMap::new(),
            reserves,
            last_ms: None,
        }
    }

    fn in_window(&self, at: u64) -> bool {
        self.from_ms.is_some_and(|from| at >= from) && at < self.window.to_ms
    }

    /// The part of `[start, end)` inside the window, ms.
    fn overlap(&self, start: u64, end: u64) -> u64 {
        let from = self.from_ms.unwrap_or(start);
        end.min(self.window.to_ms).saturating_sub(start.max(from))
    }

    /// Adds the next event of the log.
    pub fn add(&mut self, event: &UsageEvent) {
        self.records += 1;
        let at = event.at_ms;
        if self.from_ms.is_none() {
            self.from_ms = Some(at);
        }
        let since = self.last_ms.unwrap_or(at);
        self.count_idle_reserves(since, at);
        self.last_ms = Some(at.max(since));
        let hour = at / HOUR_MS * HOUR_MS;
        match &event.kind {
            UsageKind::Grant => {
                let requester = requester_of(event);
                let reserves = self
                    .reserves
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| {
                        r.rule.covers(event.product)
                            && self
                                .rules
                                .is_some_and(|rules| rules.names(&r.who, &requester))
                    })
                    .map(|(i, _)| i)
                    .collect::<Vec<_>>();
                for &i in &reserves {
                    self.reserves[i].held += 1;
                }
                self.live.insert(
                    (event.product, event.handle),
                    Live {
                        product: event.product,
                        user: event.user.clone(),
                        start_ms: at,
                        reserves,
                    },
                );
                if self.in_window(at) {
                    self.usage
                        .entry((event.product, event.user.clone()))
                        .or_default()
                        .0 += 1;
                }
                self.change_level(event.product, hour, at, 1);
            }
            UsageKind::Denial { reason, rule } => {
                if self.in_window(at) {
                    *self
                        .denials
                        .entry((hour, event.product, event.user.clone(), *reason, *rule))
                        .or_default() += 1;
                }
            }
            UsageKind::Release | UsageKind::Reclaim | UsageKind::Revocation { .. } => {
                if let Some(live) = self.live.remove(&(event.product, event.handle)) {
                    self.end(&live, at);
                    self.change_level(event.product, hour, at, -1);
                }
            }
        }
    }

    /// Reserved seats stood idle from `since` to `until` (within the window).
    fn count_idle_reserves(&mut self, since: u64, until: u64) {
        let idle = self.overlap(since, until.max(since));
        for reserve in &mut self.reserves {
            let unused = u64::from(reserve.reserved.saturating_sub(reserve.held));
            reserve.unused_ms = reserve
                .unused_ms
                .saturating_add(idle.saturating_mul(unused));
        }
    }

    /// Counts a grant's time held up to `until` (within the window) for its user.
    fn add_held(&mut self, live: &Live, until: u64) {
        let held = self.overlap(live.start_ms, until);
        self.usage
            .entry((live.product, live.user.clone()))
            .or_default()
            .1 += held;
    }

    fn end(&mut self, live: &Live, at: u64) {
        self.add_held(live, at);
        for &i in &live.reserves {
            self.reserves[i].held = self.reserves[i].held.saturating_sub(1);
        }
    }

    fn change_level(&mut self, product: ProductKey, hour: u64, at: u64, delta: i32) {
        let (level, last_hour) = self.level.entry(product).or_insert((0, hour));
        let carried = *level;
        let first_filled =
            (*last_hour + HOUR_MS).max(hour.saturating_sub(MAX_FILLED_HOURS * HOUR_MS));
        *level = level.saturating_add_signed(delta);
        *last_hour = hour;
        let now = *level;
        let from = self.from_ms.unwrap_or(at);
        let to = self.window.to_ms;
        let hour_in_window = |h: u64| h + HOUR_MS > from && h < to;
        if carried > 0 {
            let mut h = first_filled;
            while h < hour {
                if hour_in_window(h) {
                    let peak = self.peaks.entry((product, h)).or_default();
                    *peak = (*peak).max(carried);
                }
                h += HOUR_MS;
            }
        }
        if self.in_window(at) {
            let peak = self.peaks.entry((product, hour)).or_default();
            *peak = (*peak).max(now.max(carried));
        }
    }

    /// The report: grants still held count up to the window's end.
    pub fn finish(mut self) -> UsageReport {
        let to = self.window.to_ms;
        let from = self.from_ms.unwrap_or(to);
        if self.from_ms.is_none() {
            self.from_ms = Some(from);
        }
        let since = self.last_ms.unwrap_or(from);
        self.count_idle_reserves(since, to);
        let live: Vec<Live> = self.live.drain().map(|(_, l)| l).collect();
        for live in &live {
            self.add_held(live, to);
        }
        UsageReport {
            from_ms: from,
            to_ms: to,
            records: self.records,
            usage: self
                .usage
                .into_iter()
                .map(|((product, user), (grants, held_ms))| UserUsage {
                    product,
                    user,
                    grants,
                    held_ms,
                })
                .collect(),
            peaks: self
                .peaks
                .into_iter()
                .map(|((product, hour_ms), peak)| HourPeak {
                    product,
                    hour_ms,
                    peak,
                })
                .collect(),
            denials: self
                .denials
                .into_iter()
                .map(
                    |((hour_ms, product, user, reason, rule), count)| DenialCount {
                        hour_ms,
                        product,
                        user,
                        reason,
                        rule,
                        count,
                    },
                )
                .collect(),
            reserved_unused: self
                .reserves
                .into_iter()
                .map(|r| ReserveUse {
                    product: r.product,
                    rule: r.index,
                    who: crate::access_rules::describe(&r.who),
                    reserved: r.reserved,
                    unused_ms: r.unused_ms,
                })
                .collect(),
        }
    }
}

fn requester_of(event: &UsageEvent) -> Requester {
    Requester {
        user: event.user.clone(),
        machine: event.machine.clone(),
        address: event.address.as_deref().and_then(|a| a.parse().ok()),
        client_name: event.client_name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: ProductKey = ProductKey {
        firm: crate::policy::DEFAULT_FIRM,
        code: 1001,
    };

    fn ev(at_ms: u64, kind: UsageKind, handle: u64, user: &str) -> UsageEvent {
        UsageEvent {
            at_ms,
            kind,
            product: P,
            handle,
            user: Some(user.into()),
            machine: "ts1".into(),
            session: None,
            client_name: None,
            address: None,
            in_use: 0,
            held_ms: None,
        }
    }

    fn usage_of<'a>(report: &'a UsageReport, user: &str) -> &'a UserUsage {
        report
            .usage
            .iter()
            .find(|u| u.user.as_deref() == Some(user))
            .unwrap()
    }

    #[test]
    fn usage_time_peaks_and_denials() {
        let events = vec![
            ev(0, UsageKind::Grant, 1, "dan"),
            ev(1_000, UsageKind::Grant, 2, "sam"),
            ev(
                2_000,
                UsageKind::Denial {
                    reason: Reason::RuleMaxReached,
                    rule: Some(1),
                },
                0,
                "dirk",
            ),
            ev(5_000, UsageKind::Release, 1, "dan"),
            ev(HOUR_MS + 500, UsageKind::Reclaim, 2, "sam"),
        ];
        let report = build(
            events,
            None,
            Window {
                from_ms: None,
                to_ms: 2 * HOUR_MS,
            },
        );
        assert_eq!(usage_of(&report, "dan").held_ms, 5_000);
        assert_eq!(usage_of(&report, "sam").held_ms, HOUR_MS - 500);
        assert_eq!(usage_of(&report, "sam").grants, 1);
        let peaks: Vec<(u64, u32)> = report.peaks.iter().map(|p| (p.hour_ms, p.peak)).collect();
        assert_eq!(peaks, vec![(0, 2), (HOUR_MS, 1)]);
        assert_eq!(report.denials.len(), 1);
        assert_eq!(report.denials[0].user.as_deref(), Some("dirk"));
        assert_eq!(report.denials[0].rule, Some(1));
        assert_eq!(report.records, 5);
    }

    #[test]
    fn a_window_clips_usage_and_still_held_grants_count_to_its_end() {
        let events = vec![
            ev(0, UsageKind::Grant, 1, "dan"),
            ev(10_000, UsageKind::Release, 1, "dan"),
            ev(20_000, UsageKind::Grant, 2, "dan"),
        ];
        let report = build(
            events,
            None,
            Window {
                from_ms: Some(5_000),
                to_ms: 30_000,
            },
        );
        let dan = usage_of(&report, "dan");
        assert_eq!(dan.held_ms, 5_000 + 10_000);
        // The first grant was made before the window.
        assert_eq!(dan.grants, 1);
    }

    #[test]
    fn idle_reserved_seats_are_counted() {
        let rules = AccessRules::from_yaml(
            "groups: { users: { support: [sam, sue] } }\n\
             rules:\n  - { product: 1001, who: { group: support }, reserve: 2 }\n",
        )
        .unwrap();
        let events = vec![
            ev(0, UsageKind::Grant, 1, "dan"),
            ev(1_000, UsageKind::Grant, 2, "sam"),
            ev(3_000, UsageKind::Release, 2, "sam"),
        ];
        let report = build(
            events,
            Some(&rules),
            Window {
                from_ms: Some(0),
                to_ms: 4_000,
            },
        );
        // Two idle for 1 s, one for 2 s, two for 1 s: 6 seat-seconds.
        assert_eq!(report.reserved_unused.len(), 1);
        assert_eq!(report.reserved_unused[0].unused_ms, 6_000);
        assert_eq!(report.reserved_unused[0].who, "group support");
    }

    #[test]
    fn an_empty_log_reports_nothing() {
        let report = build(
            Vec::new(),
            None,
            Window {
                from_ms: None,
                to_ms: 1_000,
            },
        );
        assert_eq!(report.records, 0);
        assert!(report.usage.is_empty() && report.peaks.is_empty());
    }
}
