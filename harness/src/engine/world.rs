//! A world: the machines of one scenario, its virtual clock, its apps and the vendor's desk.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::verdict_of;
use crate::backend::{
    Backend, BackendError, Caller, CloneIdentity, GuestSpec, HostSpec, Power, Role, ServerSettings,
    SessionSpec, UsbMode,
};
use crate::identity::{IdentityMint, cpu_profile};
use crate::report::{Event, StepAnswer, Verdict};
use crate::runtime::policy::PolicyDocument;
use crate::runtime::{self, AccessAnswer, VendorDesk};
use crate::scenario::{self as sc, Scenario, Step};

/// Firm code the harness's vendor issues licences under.
pub const FIRM: u32 = 6_000_010;
/// The test vendor's name in the policy document.
const FIRM_NAME: &str = "Vigil Test Vendor";

/// How long an attach step waits for the machines' runtimes to reach the dongle.
const DONGLE_SEEN_TIMEOUT: Duration = Duration::from_secs(10);

/// An app started by a scenario.
#[derive(Debug, Clone)]
pub(super) struct AppRecord {
    pub machine: String,
    pub session: String,
    pub product: u32,
    pub answer: Option<AccessAnswer>,
    pub killed_at: Option<Instant>,
}

/// Result of running one scenario.
#[derive(Debug, Clone)]
pub struct Tally {
    /// Overall verdict.
    pub verdict: Verdict,
    /// Assertions checked.
    pub assertions: usize,
    /// Assertions failed.
    pub failed: usize,
    /// Why the scenario stopped early, if it did.
    pub error: Option<String>,
}

/// One scenario's world.
pub struct World {
    pub(super) backend: Box<dyn Backend>,
    pub(super) vendor: VendorDesk,
    pub(super) policy_file: std::path::PathBuf,
    /// The vendor's policy (what `policy_file` holds).
    policy: PolicyDocument,
    pub(super) apps: BTreeMap<String, AppRecord>,
    pub(super) probes: BTreeMap<String, AccessAnswer>,
    pub(super) servers: Vec<String>,
    /// Server triads formed, each its three members in order.
    pub(super) triads: Vec<Vec<String>>,
    /// Machines whose usage report goes into the run's report: those that served licences or
    /// had rules or usage checked.
    usage_machines: std::collections::BTreeSet<String>,
    pub(super) keepalive: Duration,
    /// Whether a partition is in force (silent stations are then released by keepalive).
    pub(super) network_cut: bool,
    /// Whether a dongle was hung (runtimes notice only when a request times out).
    pub(super) dongle_hung: bool,
    /// Products whose holders are counted after every step (a `holders` assertion names them),
    /// with the most apps seen holding each at once so far.
    pub(super) peak_holders: BTreeMap<u32, u32>,
    session_machines: BTreeMap<String, String>,
    world_offset_ms: i64,
    skews: BTreeMap<String, i64>,
    name: String,
}

impl World {
    /// Builds the world's machines (all powered off) and the vendor's policy, with the vendor's
    /// desk that certified the world's runtimes' root (see [`VendorDesk::open`]).
    pub fn new(
        mut backend: Box<dyn Backend>,
        scenario: &Scenario,
        vendor: VendorDesk,
    ) -> Result<World, BackendError> {
        let mint = IdentityMint::new(0x5eed);
        for host in &scenario.hosts {
            let cpu = {
                let mut p = cpu_profile(&host.cpu.vendor, &host.cpu.model);
                if let Some(f) = host.cpu.family {
                    p.family = f;
                }
                if let Some(s) = host.cpu.stepping {
                    p.stepping = s;
                }
                if let Some(m) = &host.cpu.microcode {
                    p.microcode = m.clone();
                }
                p
            };
            let identity = merge_identity(mint.host_identity(&host.name.value), &host.identity);
            backend.add_host(&HostSpec {
                name: host.name.value.clone(),
                cpu,
                identity,
                role: role_of(host.role),
            })?;
        }
        for guest in &scenario.guests {
            let identity = merge_identity(mint.guest_identity(&guest.name.value), &guest.identity);
            backend.add_guest(&GuestSpec {
                name: guest.name.value.clone(),
                host: guest.host.value.clone(),
                identity,
                role: role_of(guest.role),
                hide_hypervisor: guest.hide_hypervisor,
            })?;
        }
        let hosts: Vec<String> = scenario
            .hosts
            .iter()
            .map(|h| h.name.value.clone())
            .collect();
        let started_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let policy = PolicyDocument::from_scenario(&scenario.policy, FIRM, FIRM_NAME, started_ms);
        let policy_file = vendor.file("policy.yaml");
        let yaml = policy.to_yaml().map_err(|e| BackendError::Runtime {
            machine: "vendor".into(),
            message: format!("cannot write the policy: {e}"),
        })?;
        std::fs::write(&policy_file, yaml).map_err(BackendError::io("write the vendor policy"))?;
        for d in &scenario.dongles {
            let flash = program_dongle(&vendor, &policy_file, d)?;
            backend.add_dongle(&d.name.value, &flash)?;
        }
        let mut world = World {
            backend,
            vendor,
            policy_file,
            policy,
            apps: BTreeMap::new(),
            probes: BTreeMap::new(),
            servers: Vec::new(),
            triads: Vec::new(),
            usage_machines: Default::default(),
            keepalive: Duration::from_secs(10),
            network_cut: false,
            dongle_hung: false,
            peak_holders: scenario
                .steps
                .iter()
                .filter_map(|step| match &step.value {
                    Step::Expect(sc::Assertion::Holders(h)) => Some((h.product.value, 0)),
                    _ => None,
                })
                .collect(),
            session_machines: BTreeMap::new(),
            world_offset_ms: 0,
            skews: BTreeMap::new(),
            name: scenario.name.value.clone(),
        };
        // Physical machines are always up.
        for host in hosts {
            world.backend.boot(&host)?;
            world.after_boot(&host)?;
        }
        Ok(world)
    }

    /// Runs every step in order, emitting events; stops early only on harness errors,
    /// on `fail_fast` after a failed assertion, or on Ctrl-C.
    pub fn run(
        &mut self,
        scenario: &Scenario,
        fail_fast: bool,
        interrupted: &Arc<AtomicBool>,
        emit: &mut dyn FnMut(Event),
    ) -> Tally {
        let mut tally = Tally {
            verdict: Verdict::Pass,
            assertions: 0,
            failed: 0,
            error: None,
        };
        for (i, located) in scenario.steps.iter().enumerate() {
            if interrupted.load(Ordering::SeqCst) {
                tally.verdict = Verdict::Error;
                tally.error = Some("interrupted".into());
                break;
            }
            let index = i + 1;
            let line = located.at.line as usize;
            let started = Instant::now();
            if let Step::Expect(assertion) = &located.value {
                if let sc::Assertion::Usage(sc::UsageAssertion { machine, .. })
                | sc::Assertion::UsageLog(sc::UsageLogAssertion { machine, .. }) = assertion
                {
                    self.usage_machines.insert(machine.value.clone());
                }
                let check = self.check(assertion);
                tally.assertions += 1;
                let verdict = if check.holds {
                    Verdict::Pass
                } else {
                    tally.failed += 1;
                    Verdict::Fail
                };
                tally.verdict = tally.verdict.worst(verdict);
                emit(Event::Assertion {
                    scenario: self.name.clone(),
                    index,
                    line,
                    summary: check.summary,
                    expected: check.expected,
                    actual: check.actual,
                    verdict,
                    elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
                });
                if fail_fast && verdict != Verdict::Pass {
                    tally.error = Some(format!(
                        "stopped at the failed assertion of step {index} (--fail-fast)"
                    ));
                    break;
                }
                continue;
            }
            if let Step::Rules(sc::RulesStep { machine, .. })
            | Step::TamperUsageLog(sc::TamperUsageLogStep { machine, .. }) = &located.value
            {
                self.usage_machines.insert(machine.value.clone());
            }
            let summary = describe_step(&located.value);
            let machines = self.machines_of(&located.value);
            let mut result = self.step(&located.value);
            let mut holding = BTreeMap::new();
            if result.is_ok() {
                match self.count_holders() {
                    Ok(now) => holding = now,
                    Err(e) => result = Err(e),
                }
            }
            let (verdict, message) = match &result {
                Ok(()) => (Verdict::Pass, None),
                Err(e) => (verdict_of(e), Some(self.diagnose(e))),
            };
            let answers = if result.is_ok() {
                self.answers_of(&located.value)
            } else {
                Vec::new()
            };
            let power = self
                .backend
                .machines()
                .into_iter()
                .filter_map(|m| {
                    let state = self.backend.power(&m).ok()?;
                    Some((m, state.name().to_owned()))
                })
                .collect();
            emit(Event::Step {
                scenario: self.name.clone(),
                index,
                line,
                summary: summary.clone(),
                machines,
                answers,
                holding,
                power,
                elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
                verdict,
                message: message.clone(),
            });
            if let Err(_e) = result {
                tally.verdict = tally.verdict.worst(verdict);
                tally.error = Some(format!(
                    "step {index} (line {line}) `{summary}` could not run: {}",
                    message
                        .unwrap_or_default()
                        .lines()
                        .next()
                        .unwrap_or_default()
                ));
                break;
            }
        }
        self.emit_usage_reports(emit);
        tally
    }

    /// Emits the usage report of every running machine worth one (see `usage_machines`).
    fn emit_usage_reports(&mut self, emit: &mut dyn FnMut(Event)) {
        let machines: Vec<String> = self.usage_machines.iter().cloned().collect();
        for machine in machines {
            if !matches!(self.backend.power(&machine), Ok(Power::Running)) {
                continue;
            }
            let args = ["usage".to_string(), "report".to_string()];
            match runtime::meter_json(self.backend.as_mut(), &machine, Caller::Admin, &args) {
                Ok((Some(0), report)) => emit(Event::UsageReport {
                    scenario: self.name.clone(),
                    machine,
                    report,
                }),
                Ok((code, answer)) => {
                    tracing::warn!(machine, ?code, %answer, "No usage report");
                }
                Err(e) => tracing::warn!(machine, error = %e, "No usage report"),
            }
        }
    }

    /// Counts, for each product a `holders` assertion watches, the apps holding it now (granted,
    /// not revoked, still running) and keeps the peak.
    /// What the runtime answered the app, access or named activation `step` started.
    fn answers_of(&self, step: &Step) -> Vec<StepAnswer> {
        let (name, product, answer) = match step {
            Step::StartApp(s) => (
                s.name.value.clone(),
                s.product.value,
                self.apps.get(&s.name.value).and_then(|a| a.answer.as_ref()),
            ),
            Step::Access(a) => {
                let name = a
                    .name
                    .as_ref()
                    .map(|n| n.value.clone())
                    .unwrap_or_else(|| format!("access-{}", a.product.value));
                let answer = self.probes.get(&name);
                (name, a.product.value, answer)
            }
            Step::Activate(sc::ActivateStep { name, product, .. })
            | Step::ActivateTriad(sc::ActivateTriadStep { name, product, .. }) => match name {
                Some(name) => (
                    name.value.clone(),
                    product.value,
                    self.probes.get(&name.value),
                ),
                None => return Vec::new(),
            },
            _ => return Vec::new(),
        };
        answer
            .map(|answer| StepAnswer {
                product,
                name,
                granted: matches!(answer, AccessAnswer::Granted { .. }),
                reason: match answer {
                    AccessAnswer::Denied { reason, .. } => Some(reason.clone()),
                    AccessAnswer::Granted { .. } => None,
                },
            })
            .into_iter()
            .collect()
    }

    /// How many of the scenario's apps hold each product now (granted, running, not told it
    /// lost the licence; on a paused machine as they were), for every product an app was ever
    /// granted; keeps the peaks the `holders` assertions check.
    pub(super) fn count_holders(&mut self) -> Result<BTreeMap<u32, u32>, BackendError> {
        let mut now: BTreeMap<u32, u32> = BTreeMap::new();
        let mut candidates = Vec::new();
        for (name, app) in &self.apps {
            if !matches!(app.answer, Some(AccessAnswer::Granted { .. })) {
                continue;
            }
            now.entry(app.product).or_default();
            if app.killed_at.is_none() {
                candidates.push((name.clone(), app.product));
            }
        }
        for (app, product) in candidates {
            let machine = self
                .apps
                .get(&app)
                .map(|a| a.machine.clone())
                .unwrap_or_default();
            let holds = match self.backend.power(&machine)? {
                // A frozen machine's apps hold what they held; nobody inside can be asked.
                Power::Paused => true,
                Power::Off => false,
                Power::Running => {
                    self.backend.app_status(&app)? == crate::backend::AppStatus::Running
                        && runtime::revocation_in(&self.backend.app_output(&app)?).is_none()
                }
            };
            if holds {
                *now.entry(product).or_default() += 1;
            }
        }
        for (product, peak) in &mut self.peak_holders {
            *peak = (*peak).max(now.get(product).copied().unwrap_or(0));
        }
        Ok(now)
    }

    /// Stops every machine and process of the world.
    pub fn finish(&mut self) {
        if let Err(e) = self.backend.teardown() {
            tracing::warn!("teardown: {e}");
        }
    }

    /// The error plus the last lines the runtime logged on the machines it mentions.
    fn diagnose(&self, error: &BackendError) -> String {
        let mut text = format!("{error}");
        if !matches!(
            error,
            BackendError::Runtime { .. } | BackendError::Timeout { .. }
        ) {
            return text;
        }
        let logs = self.backend.log_dir();
        for machine in &self.backend.machines() {
            if !text.contains(machine.as_str()) {
                continue;
            }
            let log = logs.join(machine).join("meterd.log");
            let tail = crate::backend::log_tail(&log, 8);
            if !tail.is_empty() {
                text.push_str(&format!("\n--- last lines of {}:\n{tail}", log.display()));
            }
        }
        text
    }

    /// The machines a step acts on: those it names, the machine of the app it names, or the
    /// machines its dongle is attached to.
    fn machines_of(&self, step: &Step) -> Vec<String> {
        match step {
            Step::UsbDetach(d)
            | Step::UsbipDetach(d)
            | Step::UsbipDisconnect(d)
            | Step::UsbHang(d) => self.backend.dongle_machines(&d.value),
            Step::Release(app)
            | Step::Kill(app)
            | Step::ReleaseElsewhere(sc::ReleaseElsewhereStep { app, .. }) => self
                .apps
                .get(&app.value)
                .map(|record| vec![record.machine.clone()])
                .unwrap_or_default(),
            other => other.machines().into_iter().map(str::to_owned).collect(),
        }
    }

    fn step(&mut self, step: &Step) -> Result<(), BackendError> {
        match step {
            Step::Boot(m) => {
                self.backend.boot(&m.value)?;
                self.after_boot(&m.value)
            }
            Step::Shutdown(m) => self.backend.shutdown(&m.value),
            Step::Pause(m) => self.backend.pause(&m.value),
            Step::Resume(m) => self.backend.resume(&m.value),
            Step::Snapshot(s) => self.backend.snapshot(&s.machine.value, &s.name.value),
            Step::Revert(s) => {
                self.backend.revert(&s.machine.value, &s.snapshot.value)?;
                self.apps.retain(|_, app| app.machine != s.machine.value);
                // A snapshot of a guest that was off brings it back off.
                if self.backend.power(&s.machine.value)? == Power::Off {
                    return Ok(());
                }
                self.after_boot(&s.machine.value)
            }
            Step::Clone(c) => {
                let host = match &c.host {
                    Some(h) => h.value.clone(),
                    None => self.backend.host_of(&c.from.value)?,
                };
                let identity = match c.identity {
                    sc::CloneIdentity::New => CloneIdentity::New,
                    sc::CloneIdentity::Perfect => CloneIdentity::Perfect,
                };
                self.backend
                    .clone_guest(&c.from.value, &c.to.value, &host, identity)
            }
            Step::Migrate(m) => self.backend.migrate(&m.machine.value, &m.host.value),
            Step::Move(m) => self.backend.move_guest(&m.machine.value, &m.host.value),
            Step::ReplacePart(r) => match r.part {
                sc::Part::Nic => self.backend.replace_nic(&r.machine.value),
                other => Err(BackendError::Unsupported {
                    backend: self.backend.kind(),
                    operation: "replace-part",
                    why: format!("replacing a {other:?} is not simulated yet; only `nic`"),
                }),
            },
            Step::SessionOpen(s) => {
                let spec = match s.kind {
                    sc::SessionKind::Console => SessionSpec::Console {
                        user: s.user.value.clone(),
                    },
                    sc::SessionKind::Rdp => SessionSpec::Rdp {
                        user: s.user.value.clone(),
                        client_name: s.client_name.clone().unwrap_or_else(|| "client".into()),
                        client_ip: s
                            .client_ip
                            .map(|ip| ip.to_string())
                            .unwrap_or_else(|| "192.0.2.10".into()),
                    },
                };
                self.backend
                    .open_session(&s.machine.value, &s.name.value, &spec)?;
                self.session_machines
                    .insert(s.name.value.clone(), s.machine.value.clone());
                Ok(())
            }
            Step::SessionClose(name) => {
                let machine = self.machine_of_session(&name.value)?;
                self.backend.close_session(&machine, &name.value)
            }
            Step::ActivateTriad(a) => {
                let machines: Vec<String> = a.machines.iter().map(|m| m.value.clone()).collect();
                let answer = self.activate_triad(&machines, a.product.value)?;
                self.activation_answered(a.name.as_ref(), &machines.join(", "), answer)
            }
            Step::Activate(a) => {
                let answer = self.activate(&a.machine.value, a.product.value)?;
                self.activation_answered(a.name.as_ref(), &a.machine.value, answer)
            }
            Step::CopyLicence(c) => {
                let (code, value) =
                    self.apply_issued(&c.from.value, &c.to.value, c.product.value)?;
                if code != Some(0) {
                    tracing::info!(to = %c.to.value, answer = %value, "Copied licence refused");
                }
                Ok(())
            }
            Step::ApplyAgain(a) => {
                let (code, value) =
                    self.apply_issued(&a.machine.value, &a.machine.value, a.product.value)?;
                if code == Some(0) {
                    Ok(())
                } else {
                    Err(BackendError::Runtime {
                        machine: a.machine.value.clone(),
                        message: format!("the licence applied again was refused: {value}"),
                    })
                }
            }
            Step::ForgeLicence(f) => {
                self.forge_licence(&f.machine.value, f.product.value, f.quantity.value)
            }
            Step::Access(a) => {
                let session = a.session.as_ref().map_or("console", |s| s.value.as_str());
                let times = a.times.as_ref().map_or(1, |t| t.value).max(1);
                let mut answer = None;
                for done in 1..=times {
                    let this = runtime::probe_access(
                        self.backend.as_mut(),
                        &a.machine.value,
                        session,
                        FIRM,
                        a.product.value,
                    )?;
                    let denied = matches!(this, AccessAnswer::Denied { .. });
                    answer = Some(this);
                    if denied {
                        break;
                    }
                    if done % 100 == 0 {
                        tracing::info!(done, times, machine = %a.machine.value, "Probes");
                    }
                }
                let answer = answer.expect("times is at least 1");
                let name = a
                    .name
                    .as_ref()
                    .map(|n| n.value.clone())
                    .unwrap_or_else(|| format!("access-{}", a.product.value));
                self.probes.insert(name, answer);
                Ok(())
            }
            Step::StartApp(s) => self.start_app(
                &s.machine.value,
                s.session.as_ref().map_or("console", |x| x.value.as_str()),
                &s.name.value,
                s.product.value,
                s.leave_session.as_ref().is_some_and(|l| l.value),
            ),
            Step::Release(app) => {
                // A clean release: the app ends normally (SIGTERM), giving its licence back;
                // the step is done when the app has exited.
                self.backend.terminate_app(&app.value)?;
                if let Some(record) = self.apps.get_mut(&app.value) {
                    record.killed_at = Some(Instant::now());
                }
                let deadline = Instant::now() + runtime::COMMAND_TIMEOUT;
                while self.backend.app_status(&app.value)? == crate::backend::AppStatus::Running {
                    if Instant::now() > deadline {
                        return Err(BackendError::Timeout {
                            what: format!("app `{}` to release its licence and exit", app.value),
                            after: runtime::COMMAND_TIMEOUT,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(())
            }
            Step::Kill(app) => {
                self.backend.kill_app(&app.value)?;
                if let Some(record) = self.apps.get_mut(&app.value) {
                    record.killed_at = Some(Instant::now());
                }
                Ok(())
            }
            Step::Advance(d) => {
                let advance = i64::try_from(d.value.as_millis()).unwrap_or(i64::MAX);
                self.world_offset_ms = self.world_offset_ms.saturating_add(advance);
                self.push_clock()
            }
            Step::SetClock(s) => {
                self.skews
                    .insert(s.machine.value.clone(), s.skew.value.as_millis());
                self.push_clock()
            }
            Step::Partition(p) => {
                let machines: Vec<String> = p.machines.iter().map(|m| m.value.clone()).collect();
                let reset = p.mode == sc::PartitionMode::Reset;
                for (i, a) in machines.iter().enumerate() {
                    for b in &machines[i + 1..] {
                        self.backend.partition(
                            std::slice::from_ref(a),
                            std::slice::from_ref(b),
                            reset,
                        )?;
                    }
                }
                self.network_cut = true;
                Ok(())
            }
            Step::Heal(h) => {
                let machines: Vec<String> = h.machines.iter().map(|m| m.value.clone()).collect();
                // Only a heal of every link surely ends every cut.
                if machines.is_empty() {
                    self.network_cut = false;
                }
                self.backend.heal(&machines)
            }
            Step::ServerStart(s) => {
                let keepalive = s
                    .keepalive
                    .map(|d| d.as_std())
                    .unwrap_or(Duration::from_secs(10));
                self.keepalive = self.keepalive.max(keepalive);
                let settings = ServerSettings {
                    port: s.port.unwrap_or(22350),
                    keepalive,
                    usage_log: s.usage_log.unwrap_or(true),
                };
                self.backend.start_server(&s.machine.value, settings)?;
                self.servers.push(s.machine.value.clone());
                // A server without its usage log has no usage report to give.
                if settings.usage_log {
                    self.usage_machines.insert(s.machine.value.clone());
                }
                Ok(())
            }
            Step::DropSessionTable(m) => self.backend.drop_session_table(&m.value),
            Step::ServerCrash(m) => self.backend.crash_server(&m.value),
            Step::ServerPause(m) => self.backend.pause_server(&m.value),
            Step::ServerResume(m) => self.backend.resume_server(&m.value),
            Step::Triad(members) => {
                let members: Vec<String> = members.iter().map(|m| m.value.clone()).collect();
                self.backend.form_triad(&members)?;
                self.triads.push(members);
                Ok(())
            }
            Step::ServerStop(m) => {
                self.servers.retain(|s| s != &m.value);
                self.backend.stop_server(&m.value)
            }
            Step::ReleaseElsewhere(r) => {
                let app = &r.app;
                let record = self
                    .apps
                    .get(&app.value)
                    .ok_or_else(|| BackendError::Unknown {
                        kind: "app",
                        name: app.value.clone(),
                    })?;
                let Some(AccessAnswer::Granted {
                    handle: Some(handle),
                }) = &record.answer
                else {
                    // Nothing held, nothing to give back.
                    return Ok(());
                };
                let machine = record.machine.clone();
                let session = r
                    .session
                    .as_ref()
                    .map_or(record.session.clone(), |s| s.value.clone());
                let args = vec![
                    "release".to_string(),
                    "--handle".to_string(),
                    handle.to_string(),
                ];
                // The runtime's answer is its business; the assertions check what the app heard.
                let answer = runtime::meter_json(
                    self.backend.as_mut(),
                    &machine,
                    Caller::Session(&session),
                    &args,
                )?;
                tracing::info!(app = %app.value, %session, ?answer, "released elsewhere");
                Ok(())
            }
            Step::Wait(d) => {
                std::thread::sleep(d.value.as_std());
                Ok(())
            }
            Step::Impersonate(i) => {
                let runtime_id = if i.runtime_id {
                    let status = runtime::status(self.backend.as_mut(), &i.victim.value)?;
                    let id = status["machine"]["runtime_id"]
                        .as_str()
                        .ok_or_else(|| BackendError::Runtime {
                            machine: i.victim.value.clone(),
                            message: "`meter status` shows no machine.runtime_id".into(),
                        })?
                        .to_string();
                    Some(id)
                } else {
                    None
                };
                self.backend
                    .impersonate(&i.machine.value, &i.victim.value, runtime_id.as_deref())
            }
            Step::Rules(r) => {
                let text = serde_json::to_vec(&r.rules).expect("a JSON map always encodes");
                let path = self
                    .backend
                    .put_file(&r.machine.value, "rules.json", &text)?;
                let args = ["rules".to_string(), "apply".to_string(), path];
                self.admin_command(&r.machine.value, &args)
            }
            Step::TamperUsageLog(t) => {
                let args = ["tamper-usage-log".to_string(), t.record.value.to_string()];
                self.admin_command(&t.machine.value, &args)
            }
            Step::ClaimWitness(c) => {
                self.claim_witness(&c.machine.value, &c.victim.value, c.product.value)
            }
            Step::InflateSeats(i) => {
                let args = ["inflate-seats".to_string(), i.quantity.value.to_string()];
                self.admin_command(&i.machine.value, &args)
            }
            Step::ReleaseMemberSeats(m) => {
                self.admin_command(&m.value, &["release-member-seats".to_string()])
            }
            Step::StateSave(s) => self.backend.save_state(&s.machine.value, &s.name.value),
            Step::StateRestore(s) => self.backend.restore_state(&s.machine.value, &s.name.value),
            Step::Flood(f) => {
                let opened = self
                    .backend
                    .flood(&f.from.value, &f.to.value, f.connections.value)?;
                tracing::info!(
                    from = %f.from.value,
                    to = %f.to.value,
                    asked = f.connections.value,
                    opened,
                    "flood connections open"
                );
                Ok(())
            }
            Step::UsbAttach(u) => {
                let machines: Vec<String> = u.targets().iter().map(|m| m.value.clone()).collect();
                let mode = match u.mode {
                    sc::UsbMode::Exclusive => UsbMode::Exclusive,
                    sc::UsbMode::Shared => UsbMode::Shared,
                };
                self.backend.usb_attach(&u.dongle.value, &machines, mode)?;
                self.await_dongle_seen(&u.dongle.value, &machines);
                Ok(())
            }
            Step::UsbDetach(d) => self.backend.usb_detach(&d.value),
            Step::UsbipAttach(u) => {
                self.backend
                    .usbip_attach(&u.dongle.value, &u.machine.value)?;
                self.await_dongle_seen(&u.dongle.value, std::slice::from_ref(&u.machine.value));
                Ok(())
            }
            Step::UsbipDetach(d) => self.backend.usbip_detach(&d.value),
            Step::UsbipDisconnect(d) => self.backend.usbip_disconnect(&d.value),
            Step::UsbHang(d) => {
                self.dongle_hung = true;
                self.backend.usb_hang(&d.value)
            }
            Step::Expect(_) => Ok(()),
        }
    }

    /// Waits until the runtime of each running machine has heard from a newly attached dongle,
    /// as a runtime on a real bus would have before the next step (a guest enumerates a device
    /// well before its runtime's next look). A machine whose runtime does not answer is skipped;
    /// one that never reaches the dongle is left to the scenario's assertions. A runtime that
    /// has not yet noticed a re-plug into the same machine may pass on its old connection; its
    /// next access looks again anyway.
    fn await_dongle_seen(&mut self, dongle: &str, machines: &[String]) {
        let Some(serial) = self
            .backend
            .dongle_status(dongle)
            .ok()
            .and_then(|status| status["serial"].as_u64())
            .map(|serial| serial.to_string())
        else {
            return;
        };
        let deadline = Instant::now() + DONGLE_SEEN_TIMEOUT;
        for machine in machines {
            if self.backend.power(machine).ok() != Some(Power::Running) {
                continue;
            }
            // A runtime that is down prints only an error.
            while let Ok(status) = runtime::status(self.backend.as_mut(), machine)
                && status.get("error").is_none()
            {
                if runtime::dongle_seen(&status, &serial) {
                    break;
                }
                if Instant::now() > deadline {
                    tracing::warn!(
                        dongle,
                        machine,
                        "the runtime has not reached the dongle after {} s",
                        DONGLE_SEEN_TIMEOUT.as_secs()
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The running machine whose runtime has this id (`meter status`: `machine.runtime_id`).
    pub(super) fn machine_with_runtime_id(&mut self, id: &str) -> Option<String> {
        // A paused machine cannot answer; it holds no live binding either.
        let machines: Vec<String> = self
            .backend
            .machines()
            .into_iter()
            .filter(|m| self.backend.power(m).ok() == Some(Power::Running))
            .collect();
        machines.into_iter().find(|m| {
            runtime::status(self.backend.as_mut(), m)
                .ok()
                .and_then(|s| s["machine"]["runtime_id"].as_str().map(|r| r == id))
                .unwrap_or(false)
        })
    }

    fn machine_of_session(&self, session: &str) -> Result<String, BackendError> {
        self.session_machines
            .get(session)
            .cloned()
            .ok_or_else(|| BackendError::Unknown {
                kind: "session",
                name: session.into(),
            })
    }

    fn push_clock(&mut self) -> Result<(), BackendError> {
        let skews: Vec<(String, i64)> = self.skews.iter().map(|(k, v)| (k.clone(), *v)).collect();
        self.backend.set_clock(self.world_offset_ms, &skews)
    }

    /// Every machine trusts the vendor (the vendor ships its firm certificate with the software).
    fn after_boot(&mut self, machine: &str) -> Result<(), BackendError> {
        let certificate = std::fs::read(self.vendor.certificate())
            .map_err(BackendError::io("read the vendor's firm certificate"))?;
        let path = self.backend.put_file(machine, "firm.cert", &certificate)?;
        let (code, value) = runtime::meter_json(
            self.backend.as_mut(),
            machine,
            Caller::Admin,
            &["trust".into(), path],
        )?;
        if code != Some(0) {
            return Err(BackendError::Runtime {
                machine: machine.into(),
                message: format!("`meter trust` refused the vendor's firm certificate: {value}"),
            });
        }
        Ok(())
    }

    /// Makes `machine`'s activation request for `product` (naming its server certificate for a
    /// triad licence) and brings it to the vendor's desk; where it lies there.
    fn activation_request(
        &mut self,
        machine: &str,
        product: u32,
        triad_member: bool,
    ) -> Result<std::path::PathBuf, BackendError> {
        let request_path = self.backend.put_file(machine, "activation.request", b"")?;
        let mut args = vec![
            "activate".into(),
            "request".into(),
            "--firm".into(),
            FIRM.to_string(),
            "--product".into(),
            product.to_string(),
            "--out".into(),
            request_path.clone(),
        ];
        if triad_member {
            args.push("--triad-member".into());
        }
        let (code, value) =
            runtime::meter_json(self.backend.as_mut(), machine, Caller::Admin, &args)?;
        if code != Some(0) {
            return Err(BackendError::Runtime {
                machine: machine.into(),
                message: format!("`meter activate request` failed: {value}"),
            });
        }
        let request = self.backend.get_file(machine, &request_path)?;
        let vendor_request = self.vendor.file(&format!("{machine}-{product}.request"));
        std::fs::write(&vendor_request, request).map_err(BackendError::io("store the request"))?;
        Ok(vendor_request)
    }

    /// Installs the licence the vendor issued `machine` for `product`.
    fn install_issued(&mut self, machine: &str, product: u32) -> Result<(), BackendError> {
        let vendor_answer = self.vendor.file(&format!("{machine}-{product}.licence"));
        let licence =
            std::fs::read(&vendor_answer).map_err(BackendError::io("read the licence"))?;
        let inside =
            self.backend
                .put_file(machine, &format!("licence-{product}.json"), &licence)?;
        let (code, value) = runtime::meter_json(
            self.backend.as_mut(),
            machine,
            Caller::Admin,
            &["activate".into(), "apply".into(), inside],
        )?;
        if code != Some(0) {
            return Err(BackendError::Runtime {
                machine: machine.into(),
                message: format!("`meter activate apply` refused the licence: {value}"),
            });
        }
        Ok(())
    }

    /// Activates one triad licence for the servers of three machines: their requests (each
    /// naming its server certificate) answered together, each copy installed on its machine.
    fn activate_triad(
        &mut self,
        machines: &[String],
        product: u32,
    ) -> Result<AccessAnswer, BackendError> {
        let mut args: Vec<String> = vec!["vendor".into(), "activate-triad".into()];
        for machine in machines {
            let request = self.activation_request(machine, product, true)?;
            args.push("--request".into());
            args.push(request.display().to_string());
        }
        for machine in machines {
            args.push("--out".into());
            let out = self.vendor.file(&format!("{machine}-{product}.licence"));
            args.push(out.display().to_string());
        }
        args.extend([
            "--policy".into(),
            self.policy_file.display().to_string(),
            "--key".into(),
            self.vendor.private_key().display().to_string(),
        ]);
        let (code, value) = self.vendor.run(&args)?;
        if code != Some(0) {
            // The vendor refused (e.g. members in guests denied): nothing is installed.
            return Ok(vendor_refusal(&value));
        }
        for machine in machines {
            self.install_issued(machine, product)?;
        }
        Ok(AccessAnswer::Granted { handle: None })
    }

    /// Keeps an activation's answer under its step's name; an unnamed refusal fails the step.
    fn activation_answered(
        &mut self,
        name: Option<&sc::Name>,
        machine: &str,
        answer: AccessAnswer,
    ) -> Result<(), BackendError> {
        match (name, answer) {
            (Some(name), answer) => {
                self.probes.insert(name.value.clone(), answer);
                Ok(())
            }
            (None, AccessAnswer::Granted { .. }) => Ok(()),
            (None, AccessAnswer::Denied { reason, message }) => Err(BackendError::Runtime {
                machine: machine.to_owned(),
                message: format!("activation refused ({reason}): {message}"),
            }),
        }
    }

    /// Activates a soft licence: request on the machine, answer at the vendor's desk, install.
    fn activate(&mut self, machine: &str, product: u32) -> Result<AccessAnswer, BackendError> {
        let vendor_request = self.activation_request(machine, product, false)?;
        let vendor_answer = self.vendor.file(&format!("{machine}-{product}.licence"));
        let (code, value) = self.vendor.run(&[
            "vendor".into(),
            "activate".into(),
            "--request".into(),
            vendor_request.display().to_string(),
            "--policy".into(),
            self.policy_file.display().to_string(),
            "--key".into(),
            self.vendor.private_key().display().to_string(),
            "--out".into(),
            vendor_answer.display().to_string(),
        ])?;
        if code != Some(0) {
            // The vendor refused (e.g. activation in a VM denied): nothing is installed.
            return Ok(vendor_refusal(&value));
        }
        self.install_issued(machine, product)?;
        Ok(AccessAnswer::Granted { handle: None })
    }

    /// Copies the licence file a machine was given onto another machine and installs it there,
    /// as a user copying files would. The runtime may refuse it or mark it corrupt.
    /// Applies the licence file `from` was issued for `product` on `to`: `meter activate
    /// apply`'s exit code and answer.
    fn apply_issued(
        &mut self,
        from: &str,
        to: &str,
        product: u32,
    ) -> Result<(Option<i32>, serde_json::Value), BackendError> {
        let issued = self.vendor.file(&format!("{from}-{product}.licence"));
        let licence = std::fs::read(&issued).map_err(|_| BackendError::Runtime {
            machine: from.into(),
            message: format!("no licence for product {product} was activated on {from}"),
        })?;
        let inside = self
            .backend
            .put_file(to, &format!("licence-{product}.json"), &licence)?;
        runtime::meter_json(
            self.backend.as_mut(),
            to,
            Caller::Admin,
            &["activate".into(), "apply".into(), inside],
        )
    }

    /// `machine`'s runtime hands the witnesses a receipt of the licence that holds `product` on
    /// `victim` (read from the victim's status), signed with its own key. What the witnesses
    /// answer is logged: the victim's later checks tell whether the claim hurt it.
    /// Runs an administrator's `meter` command on `machine`; an error unless it exits 0.
    fn admin_command(&mut self, machine: &str, args: &[String]) -> Result<(), BackendError> {
        let (code, answer) =
            runtime::meter_json(self.backend.as_mut(), machine, Caller::Admin, args)?;
        if code == Some(0) {
            Ok(())
        } else {
            Err(BackendError::Runtime {
                machine: machine.into(),
                message: format!("`meter {}` refused: {answer}", args.join(" ")),
            })
        }
    }

    fn claim_witness(
        &mut self,
        machine: &str,
        victim: &str,
        product: u32,
    ) -> Result<(), BackendError> {
        let status = runtime::status(self.backend.as_mut(), victim)?;
        let licence =
            runtime::soft_licence_of(&status, product).ok_or_else(|| BackendError::Runtime {
                machine: victim.into(),
                message: format!("`meter status` shows no soft licence of product {product}"),
            })?;
        let args = vec!["claim-witness".to_string(), licence.clone()];
        let (code, answer) =
            runtime::meter_json(self.backend.as_mut(), machine, Caller::Admin, &args)?;
        if code != Some(0) {
            return Err(BackendError::Runtime {
                machine: machine.into(),
                message: format!("`meter claim-witness {licence}` failed: {answer}"),
            });
        }
        tracing::info!(machine, victim, %licence, %answer, "claimed a witness chain");
        Ok(())
    }

    /// The licensee on `machine` mints a licence for `product` with `quantity` seats under a
    /// vendor key and root of their own, trusts it and applies it. What the runtime refuses is
    /// logged, not an error: the expectations after the step say whether the forgery worked.
    fn forge_licence(
        &mut self,
        machine: &str,
        product: u32,
        quantity: u32,
    ) -> Result<(), BackendError> {
        let mut forged = self.policy.clone();
        forged.products.retain(|p| p.code == product);
        for item in &mut forged.products {
            item.quantity = quantity;
        }
        let yaml = forged.to_yaml().map_err(|e| BackendError::Runtime {
            machine: machine.into(),
            message: format!("cannot write the forged policy: {e}"),
        })?;
        let policy = self
            .backend
            .put_file(machine, "forged-policy.yaml", yaml.as_bytes())?;
        let dir = std::path::Path::new(&policy)
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        let at = |name: &str| format!("{dir}/{name}");
        let tool_steps: [Vec<String>; 4] = [
            vec![
                "root".into(),
                "keygen".into(),
                "--out".into(),
                at("forged-root"),
            ],
            vec![
                "vendor".into(),
                "keygen".into(),
                "--out".into(),
                at("forged-vendor"),
            ],
            vec![
                "root".into(),
                "certify".into(),
                "--root".into(),
                at("forged-root/root.key"),
                "--firm".into(),
                FIRM.to_string(),
                "--vendor".into(),
                at("forged-vendor/vendor.pub"),
                "--out".into(),
                at("forged.cert"),
            ],
            vec![
                "vendor".into(),
                "issue".into(),
                "--policy".into(),
                policy,
                "--key".into(),
                at("forged-vendor/vendor.key"),
                "--out".into(),
                at("forged-licence.json"),
            ],
        ];
        for args in &tool_steps {
            let (code, value) =
                runtime::meter_json(self.backend.as_mut(), machine, Caller::Admin, args)?;
            if code != Some(0) {
                return Err(BackendError::Runtime {
                    machine: machine.into(),
                    message: format!("`meter {}` failed: {value}", args.join(" ")),
                });
            }
        }
        for (what, args) in [
            ("trust", vec!["trust".into(), at("forged.cert")]),
            (
                "apply",
                vec!["activate".into(), "apply".into(), at("forged-licence.json")],
            ),
        ] {
            let (code, answer) =
                runtime::meter_json(self.backend.as_mut(), machine, Caller::Admin, &args)?;
            tracing::info!(machine, what, ?code, %answer, "forged licence");
        }
        Ok(())
    }

    fn start_app(
        &mut self,
        machine: &str,
        session: &str,
        app: &str,
        product: u32,
        leaves_session: bool,
    ) -> Result<(), BackendError> {
        self.backend.start_app(
            machine,
            session,
            app,
            &runtime::hold_args(FIRM, product),
            leaves_session,
        )?;
        let deadline = Instant::now() + runtime::COMMAND_TIMEOUT;
        let answer = loop {
            let lines = self.backend.app_output(app)?;
            if let Some(answer) = lines.iter().find_map(|l| AccessAnswer::from_json(l)) {
                break answer;
            }
            if let crate::backend::AppStatus::Exited { code, signal } =
                self.backend.app_status(app)?
            {
                // Give the output file a last look: the app may have written and exited at once.
                let lines = self.backend.app_output(app)?;
                if let Some(answer) = lines.iter().find_map(|l| AccessAnswer::from_json(l)) {
                    break answer;
                }
                return Err(BackendError::Runtime {
                    machine: machine.into(),
                    message: format!(
                        "app `{app}` exited (code {code:?}, signal {signal:?}) without an answer"
                    ),
                });
            }
            if Instant::now() > deadline {
                return Err(BackendError::Timeout {
                    what: format!("app `{app}` on {machine} to get an answer from the runtime"),
                    after: runtime::COMMAND_TIMEOUT,
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        self.apps.insert(
            app.to_string(),
            AppRecord {
                machine: machine.to_string(),
                session: session.to_string(),
                product,
                answer: Some(answer),
                killed_at: None,
            },
        );
        Ok(())
    }
}

/// Has the vendor program a dongle with the scenario's products; returns its flash file.
fn program_dongle(
    vendor: &VendorDesk,
    policy_file: &Path,
    dongle: &sc::Dongle,
) -> Result<std::path::PathBuf, BackendError> {
    use sha2::Digest;
    let serial = match &dongle.serial {
        Some(s) => s.parse::<u64>().unwrap_or_else(|_| {
            let d = sha2::Sha256::digest(s.as_bytes());
            u64::from_le_bytes(d[..8].try_into().expect("8 bytes")) % 10_000_000_000
        }),
        None => {
            let d = sha2::Sha256::digest(dongle.name.value.as_bytes());
            3_000_000_000 + u64::from_le_bytes(d[..8].try_into().expect("8 bytes")) % 1_000_000_000
        }
    };
    let flash = vendor.file(&format!("dongle-{}.flash.json", dongle.name.value));
    let products: Vec<String> = dongle
        .products
        .iter()
        .map(|p| p.value.to_string())
        .collect();
    let (code, value) = vendor.run(&[
        "vendor".into(),
        "dongle".into(),
        "program".into(),
        "--policy".into(),
        policy_file.display().to_string(),
        "--key".into(),
        vendor.private_key().display().to_string(),
        "--serial".into(),
        serial.to_string(),
        "--products".into(),
        products.join(","),
        "--max-rebinds".into(),
        dongle.policy.max_rebinds.to_string(),
        "--rebind-window-ms".into(),
        dongle.policy.window.as_millis().to_string(),
        "--lockout-ms".into(),
        dongle.policy.lockout.as_millis().to_string(),
        "--out".into(),
        flash.display().to_string(),
    ])?;
    if code != Some(0) {
        return Err(BackendError::Runtime {
            machine: "vendor".into(),
            message: format!("`meter vendor dongle program` failed: {value}"),
        });
    }
    Ok(flash)
}

/// What a step does, in words, for reports.
pub fn describe_step(step: &Step) -> String {
    let body = serde_json::to_value(step)
        .ok()
        .and_then(|v| v.as_object().and_then(|o| o.values().next().cloned()))
        .map(|v| match v {
            serde_json::Value::String(s) => s,
            other => compact(&other),
        })
        .unwrap_or_default();
    format!("{}: {body}", step.keyword())
}

fn compact(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Object(map) => {
            let parts: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{k}: {}", compact(v)))
                .collect();
            format!("{{{}}}", parts.join(", "))
        }
        serde_json::Value::Array(items) => {
            format!(
                "[{}]",
                items.iter().map(compact).collect::<Vec<_>>().join(", ")
            )
        }
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn role_of(role: sc::Role) -> Role {
    match role {
        sc::Role::Workstation => Role::Workstation,
        sc::Role::TerminalServer => Role::TerminalServer,
    }
}

fn merge_identity(
    mut generated: crate::backend::HardwareIdentity,
    given: &sc::Identity,
) -> crate::backend::HardwareIdentity {
    if let Some(v) = &given.board_serial {
        generated.board_serial = v.clone();
    }
    if let Some(v) = &given.product_uuid {
        generated.product_uuid = v.clone();
    }
    if let Some(v) = &given.product_serial {
        generated.product_serial = v.clone();
    }
    if !given.disk_serials.is_empty() {
        generated.disk_serials = given.disk_serials.clone();
    }
    if !given.macs.is_empty() {
        generated.macs = given.macs.iter().map(|m| m.value.clone()).collect();
    }
    generated
}

/// What the vendor tool's refusal says, as an activation's answer.
fn vendor_refusal(value: &serde_json::Value) -> AccessAnswer {
    let text = |key: &str| {
        value
            .get(key)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    AccessAnswer::Denied {
        reason: text("reason").unwrap_or_else(|| "unknown".to_owned()),
        message: text("error").unwrap_or_default(),
    }
}
