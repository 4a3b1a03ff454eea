//! Checking `expect` assertions against what the runtime shows.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::world::World;
use crate::backend::{AppStatus, Caller, Power};
use crate::runtime::{self, AccessAnswer};
use crate::scenario::{self as sc, Assertion};

/// The outcome of one assertion.
#[derive(Debug, Clone)]
pub struct Check {
    /// Whether it held.
    pub holds: bool,
    /// What was asserted, in words.
    pub summary: String,
    /// Expected value, in words.
    pub expected: String,
    /// Actual value, in words.
    pub actual: String,
}

/// How long a state assertion waits for the runtime to settle (releases and counts are
/// asynchronous: a kill is noticed by a pidfd, a vanished station by its keepalive window, so
/// while the network is cut the window covers two keepalive windows).
fn settle_window(world: &World) -> Duration {
    // A hung dongle is noticed only when a request to it times out (2 s in the reference runtime).
    let base = if world.dongle_hung {
        Duration::from_secs(8)
    } else {
        Duration::from_secs(3)
    };
    if world.network_cut {
        base.max(world.keepalive * 2 + Duration::from_secs(2))
    } else {
        base
    }
}

impl World {
    /// Checks one assertion.
    pub(super) fn check(&mut self, assertion: &Assertion) -> Check {
        match assertion {
            Assertion::Granted { app } => self.check_answer(&app.value, None),
            Assertion::Denied { app, reason } => {
                self.check_answer(&app.value, Some(reason.value.code()))
            }
            Assertion::InUse(a) => self.check_in_use(a),
            Assertion::Licence(a) => {
                let expected = licence_state_code(a.state).to_string();
                let summary = format!(
                    "licence of product {} on {} is {expected}",
                    a.product.value, a.machine.value
                );
                let machine = a.machine.value.clone();
                let product = a.product.value;
                self.poll(summary, expected, |world| {
                    let status = runtime::status(world.backend.as_mut(), &machine)
                        .map_err(|e| e.to_string())?;
                    Ok(licence_state_in(&status, product))
                })
            }
            Assertion::Units(a) => {
                let summary = format!(
                    "product {} on {} has {} units left",
                    a.product.value, a.machine.value, a.left
                );
                let machine = a.machine.value.clone();
                let product = a.product.value;
                self.poll(summary, a.left.to_string(), |world| {
                    let status = runtime::status(world.backend.as_mut(), &machine)
                        .map_err(|e| e.to_string())?;
                    Ok(runtime::product_in_status(&status, product)
                        .and_then(|(_, p)| p.get("units_left").and_then(Value::as_u64))
                        .map_or_else(|| "no units".to_string(), |u| u.to_string()))
                })
            }
            Assertion::Dongle(a) => self.check_dongle(a),
            Assertion::ReleasedWithin(a) => self.check_released_within(&a.app.value, a.ms),
            Assertion::App(a) => self.check_app(a),
            Assertion::Holders(a) => self.check_holders(a),
            Assertion::Responsive(machine) => self.check_responsive(&machine.value),
            Assertion::Usage(a) => self.check_usage(a),
            Assertion::UsageLog(a) => self.check_usage_log(a),
            Assertion::SeatHistory(a) => self.check_seat_history(a),
        }
    }

    fn check_seat_history(&mut self, a: &sc::SeatHistoryAssertion) -> Check {
        let product = a.product.value;
        let summary = format!(
            "the servers' seats of product {product} never exceeded {}, and every app holding one has it there",
            a.at_most
        );
        let expected = format!("at most {} at once; no app without its seat", a.at_most);
        match self.seat_history_findings(product, a.at_most) {
            Ok(findings) => Check {
                holds: findings.is_empty(),
                summary,
                expected,
                actual: if findings.is_empty() {
                    "as expected".to_owned()
                } else {
                    findings.join("; ")
                },
            },
            Err(e) => Check {
                holds: false,
                summary,
                expected,
                actual: format!("error: {e}"),
            },
        }
    }

    /// What is wrong with the triads' committed history of `product` (nothing: empty).
    fn seat_history_findings(
        &mut self,
        product: u32,
        at_most: u32,
    ) -> Result<Vec<String>, crate::backend::BackendError> {
        let mut findings = Vec::new();
        let mut holders = std::collections::BTreeSet::new();
        let triads = self.triads.clone();
        for triad in &triads {
            // Every member committed one log: the longest history it still holds is read.
            let mut longest: Option<(String, super::seat_history::SeatHistory)> = None;
            for member in triad {
                if self.backend.power(member)? != Power::Running {
                    continue;
                }
                let status = self.backend.triad_history(member)?;
                let read = read_history(&status, product);
                if longest.as_ref().is_none_or(|(_, l)| read.events > l.events) {
                    longest = Some((member.clone(), read));
                }
            }
            let Some((member, read)) = longest else {
                findings.push(format!("no member of {} runs", triad.join(", ")));
                continue;
            };
            note_history(&mut findings, &mut holders, &member, read, at_most);
        }
        // A lone server's seats are in its usage log (`meter usage seats`).
        let members: std::collections::BTreeSet<String> =
            triads.iter().flatten().cloned().collect();
        let lone: std::collections::BTreeSet<String> = self
            .servers
            .iter()
            .filter(|s| !members.contains(*s))
            .cloned()
            .collect();
        for server in lone {
            if self.backend.power(&server)? != Power::Running {
                continue;
            }
            let args = ["usage".to_string(), "seats".to_string()];
            let seats =
                match runtime::meter_json(self.backend.as_mut(), &server, Caller::Admin, &args)? {
                    (Some(0), seats) => seats,
                    (_, answer) => {
                        let why = answer
                            .get("error")
                            .and_then(Value::as_str)
                            .map_or_else(|| answer.to_string(), str::to_owned);
                        findings.push(format!("{server}'s seats cannot be read: {why}"));
                        continue;
                    }
                };
            let read = read_history(&seats, product);
            note_history(&mut findings, &mut holders, &server, read, at_most);
        }
        // An app a triad answered (a client's, or one on a member's own machine) must hold its
        // seat in the history: granted and then lost would let another take it.
        let apps: Vec<(String, String)> = self
            .apps
            .iter()
            .filter(|(_, app)| app.product == product && app.killed_at.is_none())
            .filter(|(_, app)| matches!(app.answer, Some(AccessAnswer::Granted { .. })))
            .map(|(name, app)| (name.clone(), app.machine.clone()))
            .collect();
        for (app, machine) in apps {
            if self.backend.power(&machine)? != Power::Running
                || self.backend.app_status(&app)? != crate::backend::AppStatus::Running
                || runtime::revocation_in(&self.backend.app_output(&app)?).is_some()
            {
                continue;
            }
            let status = runtime::status(self.backend.as_mut(), &machine)?;
            let id = status
                .pointer("/machine/runtime_id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            // A client runtime holds its triad seats as itself; a triad member's own apps hold
            // theirs under the name its status gives (runtime contract, *Server triads*); a
            // lone server's seats are held by the station's machine.
            let apps_holder = status
                .pointer("/triad/apps_holder")
                .and_then(Value::as_str)
                .map(str::to_owned);
            let station = status
                .pointer("/machine/name")
                .and_then(Value::as_str)
                .unwrap_or(&machine)
                .to_owned();
            // (its name, or the name with a suffix when another runtime claimed it first).
            let holds_as_station = |h: &String| {
                h == &station
                    || h.strip_prefix(station.as_str())
                        .is_some_and(|r| r.starts_with('~'))
            };
            if !holders.contains(&id)
                && !apps_holder.is_some_and(|apps| holders.contains(&apps))
                && !holders.iter().any(holds_as_station)
            {
                findings.push(format!(
                    "{app} on {machine} runs with a seat no triad's history holds"
                ));
            }
        }
        Ok(findings)
    }

    fn check_holders(&mut self, a: &sc::HoldersAssertion) -> Check {
        let product = a.product.value;
        let summary = format!(
            "at most {} app(s) held product {product} at once, at every step so far",
            a.at_most
        );
        let expected = format!("at most {}", a.at_most);
        if let Err(e) = self.count_holders() {
            return Check {
                holds: false,
                summary,
                expected,
                actual: format!("error: {e}"),
            };
        }
        let peak = self.peak_holders.get(&product).copied().unwrap_or(0);
        Check {
            holds: peak <= a.at_most,
            summary,
            expected,
            actual: format!("{peak} at once"),
        }
    }

    fn check_responsive(&mut self, machine: &str) -> Check {
        let within = sc::RESPONSIVE_WITHIN.as_std();
        let started = Instant::now();
        let answer = self.backend.run_meter(
            machine,
            Caller::Session("console"),
            &["status".to_string(), "--json".to_string()],
            within,
        );
        let took = started.elapsed();
        let actual = match answer {
            Ok(out) if out.code == Some(0) => format!("answered in {} ms", took.as_millis()),
            Ok(out) => format!("answered with exit {:?}: {}", out.code, out.stderr.trim()),
            Err(e) => format!("no answer: {e}"),
        };
        Check {
            holds: actual.starts_with("answered in"),
            summary: format!("the runtime on {machine} answers `meter status`"),
            expected: format!("an answer within {} ms", within.as_millis()),
            actual,
        }
    }

    /// Re-reads an actual value until it equals the expected one or the settle window ends.
    fn poll(
        &mut self,
        summary: String,
        expected: String,
        mut read: impl FnMut(&mut World) -> Result<String, String>,
    ) -> Check {
        let wanted = expected.clone();
        self.poll_until(summary, expected, |world| {
            read(world).map(|actual| {
                let holds = actual == wanted;
                (actual, holds)
            })
        })
    }

    /// Re-reads until `read` says the assertion holds or the settle window ends; the value
    /// last read is reported.
    pub(super) fn poll_until(
        &mut self,
        summary: String,
        expected: String,
        mut read: impl FnMut(&mut World) -> Result<(String, bool), String>,
    ) -> Check {
        let deadline = Instant::now() + settle_window(self);
        loop {
            let (actual, holds) = match read(self) {
                Ok(answer) => answer,
                Err(e) => (format!("error: {e}"), false),
            };
            if holds || Instant::now() > deadline {
                return Check {
                    holds,
                    summary,
                    expected,
                    actual,
                };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn check_answer(&mut self, name: &str, denied_reason: Option<&str>) -> Check {
        let answer: Option<AccessAnswer> = self
            .apps
            .get(name)
            .and_then(|a| a.answer.clone())
            .or_else(|| self.probes.get(name).cloned());
        let expected = match denied_reason {
            None => "granted".to_string(),
            Some(reason) => format!("denied ({reason})"),
        };
        let actual = answer.map_or_else(|| "no answer recorded".to_string(), |a| a.describe());
        Check {
            holds: actual == expected,
            summary: format!("{name} is {expected}"),
            expected,
            actual,
        }
    }

    fn check_in_use(&mut self, a: &sc::InUseAssertion) -> Check {
        let machine = match &a.machine {
            Some(m) => m.value.clone(),
            None => match self.servers.last() {
                Some(s) => s.clone(),
                None => {
                    return Check {
                        holds: false,
                        summary: format!("product {} in use", a.product.value),
                        expected: "a counting machine".into(),
                        actual: "no `machine` given and no server running".into(),
                    };
                }
            },
        };
        let mut expected_parts = Vec::new();
        if let Some(s) = a.stations {
            expected_parts.push(format!("{s} stations"));
        }
        if let Some(n) = a.accesses {
            expected_parts.push(format!("{n} accesses"));
        }
        let expected = expected_parts.join(", ");
        let summary = format!(
            "product {} in use on {machine}: {expected}",
            a.product.value
        );
        let product = a.product.value;
        let (want_stations, want_accesses) = (a.stations, a.accesses);
        self.poll(summary, expected, move |world| {
            let status =
                runtime::status(world.backend.as_mut(), &machine).map_err(|e| e.to_string())?;
            let in_use = runtime::product_in_status(&status, product)
                .and_then(|(_, p)| p.get("in_use").cloned())
                .unwrap_or(Value::Null);
            let stations = in_use.get("stations").and_then(Value::as_u64).unwrap_or(0);
            let accesses = in_use.get("accesses").and_then(Value::as_u64).unwrap_or(0);
            let mut parts = Vec::new();
            if want_stations.is_some() {
                parts.push(format!("{stations} stations"));
            }
            if want_accesses.is_some() {
                parts.push(format!("{accesses} accesses"));
            }
            Ok(parts.join(", "))
        })
    }

    fn check_released_within(&mut self, app: &str, ms: u64) -> Check {
        let summary = format!("{app}'s licence released within {ms} ms of its kill");
        let expected = format!("released within {ms} ms");
        let Some(record) = self.apps.get(app).cloned() else {
            return Check {
                holds: false,
                summary,
                expected,
                actual: format!("no app `{app}`"),
            };
        };
        let Some(killed_at) = record.killed_at else {
            return Check {
                holds: false,
                summary,
                expected,
                actual: format!("`{app}` was never killed"),
            };
        };
        let Some(AccessAnswer::Granted {
            handle: Some(handle),
        }) = record.answer
        else {
            return Check {
                holds: false,
                summary,
                expected,
                actual: format!("`{app}` held no licence"),
            };
        };
        let deadline = killed_at + Duration::from_millis(ms) + settle_window(self);
        let actual = loop {
            let listed = runtime::meter_json(
                self.backend.as_mut(),
                &record.machine,
                Caller::Admin,
                &["list".to_string()],
            );
            let seen_at = Instant::now();
            match listed {
                Ok((_, value)) => {
                    let held = value
                        .get("allocations")
                        .and_then(Value::as_array)
                        .is_some_and(|list| {
                            list.iter()
                                .any(|a| a.get("handle").and_then(Value::as_u64) == Some(handle))
                        });
                    if !held {
                        let waited = seen_at.duration_since(killed_at).as_millis();
                        break (waited as u64, format!("released after at most {waited} ms"));
                    }
                }
                Err(e) => break (u64::MAX, format!("error: {e}")),
            }
            if Instant::now() > deadline {
                break (u64::MAX, "still held".to_string());
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        Check {
            holds: actual.0 <= ms,
            summary,
            expected,
            actual: actual.1,
        }
    }

    fn check_dongle(&mut self, a: &sc::DongleAssertion) -> Check {
        let name = a.name.value.clone();
        let mut expected = Vec::new();
        if let Some(machine) = &a.bound_to {
            expected.push(format!("bound to {}", machine.value));
        }
        if let Some(state) = a.state {
            expected.push(dongle_state_code(state).to_string());
        }
        if let Some(until) = a.until {
            expected.push(format!("locked for {} s", until.as_millis() / 1000));
        }
        let expected = expected.join(", ");
        let summary = format!("dongle {name} is {expected}");
        let want_bound = a.bound_to.is_some();
        let want_state = a.state.is_some();
        let until = a.until.map(|u| u.as_millis());
        self.poll(summary, expected, move |world| {
            let status = world
                .backend
                .dongle_status(&name)
                .map_err(|e| e.to_string())?;
            let oscillator = status["oscillator-ms"].as_u64().unwrap_or(0);
            let lockout_until = status["lockout"]["until-ms"].as_u64();
            let lockout_since = status["lockout"]["since-ms"].as_u64().unwrap_or(0);
            let runtime = status["binding"]["runtime"].as_str().map(str::to_string);
            let mut parts = Vec::new();
            if want_bound {
                let machine = match &runtime {
                    Some(id) => world
                        .machine_with_runtime_id(id)
                        .unwrap_or_else(|| format!("runtime `{id}`")),
                    None => "nobody".into(),
                };
                parts.push(format!("bound to {machine}"));
            }
            if want_state {
                let state = if lockout_until.is_some_and(|u| u > oscillator) {
                    "locked-out"
                } else if runtime.is_some() {
                    "bound"
                } else {
                    "unbound"
                };
                parts.push(state.to_string());
            }
            if let Some(expected_ms) = until {
                // The lockout's length from when the dongle set it: what is left when it is read
                // would also count the time the harness took to get here.
                let left = lockout_until
                    .filter(|u| *u > oscillator)
                    .map_or(0, |u| u.saturating_sub(lockout_since));
                // Checked to within one second: report the expected figure when close enough.
                let shown = if left.abs_diff(expected_ms) <= 1000 {
                    expected_ms / 1000
                } else {
                    left / 1000
                };
                parts.push(format!("locked for {shown} s"));
            }
            Ok(parts.join(", "))
        })
    }

    fn check_app(&mut self, a: &sc::AppAssertion) -> Check {
        let app = a.app.value.clone();
        let expected = match (a.state, &a.reason) {
            (sc::AppState::Revoked, Some(reason)) => format!("revoked ({})", reason.value.code()),
            (state, _) => app_state_code(state).to_string(),
        };
        let summary = format!("app {app} is {expected}");
        let with_reason = a.reason.is_some();
        self.poll(summary, expected, move |world| {
            let lines = world.backend.app_output(&app).map_err(|e| e.to_string())?;
            if let Some(reason) = runtime::revocation_in(&lines) {
                return Ok(if with_reason {
                    format!("revoked ({reason})")
                } else {
                    "revoked".into()
                });
            }
            Ok(
                match world.backend.app_status(&app).map_err(|e| e.to_string())? {
                    AppStatus::Running => "running".into(),
                    AppStatus::Exited { .. } => "exited".into(),
                },
            )
        })
    }
}

fn licence_state_code(state: sc::LicenceState) -> &'static str {
    match state {
        sc::LicenceState::Valid => "valid",
        sc::LicenceState::Corrupt => "corrupt",
        sc::LicenceState::Locked => "locked",
        sc::LicenceState::Expired => "expired",
    }
}

fn dongle_state_code(state: sc::DongleState) -> &'static str {
    match state {
        sc::DongleState::Bound => "bound",
        sc::DongleState::Unbound => "unbound",
        sc::DongleState::LockedOut => "locked-out",
    }
}

fn app_state_code(state: sc::AppState) -> &'static str {
    match state {
        sc::AppState::Running => "running",
        sc::AppState::Revoked => "revoked",
        sc::AppState::Exited => "exited",
    }
}

/// The state of the container holding a product, as `meter status` shows it.
fn licence_state_in(status: &Value, product: u32) -> String {
    match runtime::product_in_status(status, product) {
        Some((container, entry)) => entry
            .get("state")
            .or_else(|| container.get("state"))
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string(),
        None => "no licence for this product".into(),
    }
}

/// The seat events of `product` a server's `history` lists (`meter triad status --history`,
/// `meter usage seats`).
fn read_history(answer: &Value, product: u32) -> super::seat_history::SeatHistory {
    let events = answer
        .get("history")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    super::seat_history::read(&events, product)
}

/// Notes what `server`'s history says: too many seats at once, events that do not add up,
/// and the holders of seats still running.
fn note_history(
    findings: &mut Vec<String>,
    holders: &mut std::collections::BTreeSet<String>,
    server: &str,
    read: super::seat_history::SeatHistory,
    at_most: u32,
) {
    if read.peak > at_most {
        findings.push(format!("{} seats at once on {server}'s history", read.peak));
    }
    findings.extend(read.anomalies.iter().map(|a| format!("{server}: {a}")));
    holders.extend(read.holders);
}
