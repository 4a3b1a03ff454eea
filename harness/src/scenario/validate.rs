//! Checks a parsed scenario as a whole before anything runs: names, references and machine states.

use std::collections::{HashMap, HashSet};

use super::error::{Problem, Source};
use super::located::{Located, Position};
use super::model::{
    AllowedByPolicy, Assertion, Container, DongleState, Name, ProductCode, Role, Scenario,
    SessionKind, Step, UsbMode, WitnessPolicy,
};
use super::model::{MAX_ACCESS_TIMES, MAX_FORGED_QUANTITY};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Host,
    Guest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Power {
    Off,
    Running,
    Paused,
}

#[derive(Debug, Clone)]
struct Machine {
    kind: Kind,
    role: Role,
    host: Option<String>,
    declared: Position,
    power: Power,
    /// Why the machine is in its current power state, for messages.
    power_note: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AppKind {
    App,
    Access,
}

#[derive(Debug, Clone)]
struct App {
    kind: AppKind,
    machine: String,
    session: Option<String>,
    declared: Position,
    live: bool,
    end_note: String,
    killed: bool,
}

#[derive(Debug, Clone)]
struct Session {
    machine: String,
    declared: Position,
    open: bool,
    end_note: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Attachment {
    Unplugged,
    Usb(Vec<String>),
    Usbip(String),
}

/// Checks `scenario` and returns every problem found, in file order.
pub(crate) fn validate(scenario: &Scenario, source: &Source) -> Vec<Problem> {
    let mut checker = Checker::new(source);
    checker.declarations(scenario);
    checker.steps(scenario);
    let mut problems = checker.problems;
    problems.sort_by_key(|p| (p.at.line, p.at.column));
    problems
}

/// Checks a policy on its own (as `vigil audit` reads one): its products, as a scenario's.
pub(crate) fn validate_policy(policy: &super::Policy, source: &Source) -> Vec<Problem> {
    let mut checker = Checker::new(source);
    checker.declare_policy(policy);
    let mut problems = checker.problems;
    problems.sort_by_key(|p| (p.at.line, p.at.column));
    problems
}

struct Checker<'a> {
    source: &'a Source,
    problems: Vec<Problem>,
    machines: HashMap<String, Machine>,
    machine_order: Vec<String>,
    future_clones: HashMap<String, Position>,
    products: HashMap<u32, ProductInfo>,
    product_order: Vec<u32>,
    dongles: HashMap<String, Attachment>,
    dongle_order: Vec<String>,
    apps: HashMap<String, App>,
    app_order: Vec<String>,
    sessions: HashMap<String, Session>,
    session_order: Vec<String>,
    snapshots: HashMap<String, Vec<(String, Power)>>,
    /// Saved copies of each machine's runtime state folder (`state-save`).
    state_copies: HashMap<String, Vec<String>>,
    servers: Vec<String>,
    /// Machines whose servers are frozen (`server-pause`).
    paused_servers: Vec<String>,
    /// Machines whose servers are members of a triad.
    triad_members: Vec<String>,
    /// The world clock's advance so far.
    advanced: super::Duration,
}

#[derive(Debug, Clone)]
struct ProductInfo {
    name: String,
    container: Container,
    metered: bool,
}

fn listing<'n>(names: impl IntoIterator<Item = &'n String>) -> String {
    let names: Vec<&str> = names.into_iter().map(String::as_str).collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

impl<'a> Checker<'a> {
    fn new(source: &'a Source) -> Self {
        Self {
            source,
            problems: Vec::new(),
            machines: HashMap::new(),
            machine_order: Vec::new(),
            future_clones: HashMap::new(),
            advanced: super::Duration::default(),
            products: HashMap::new(),
            product_order: Vec::new(),
            dongles: HashMap::new(),
            dongle_order: Vec::new(),
            apps: HashMap::new(),
            app_order: Vec::new(),
            sessions: HashMap::new(),
            session_order: Vec::new(),
            snapshots: HashMap::new(),
            state_copies: HashMap::new(),
            servers: Vec::new(),
            triad_members: Vec::new(),
            paused_servers: Vec::new(),
        }
    }

    fn report(
        &mut self,
        at: Position,
        message: impl Into<String>,
        label: impl Into<String>,
        help: Option<String>,
    ) {
        self.problems
            .push(self.source.problem(at, message, label, help));
    }

    // ---- declarations -------------------------------------------------------------------

    fn declarations(&mut self, scenario: &Scenario) {
        self.safe_name(&scenario.name, "scenario");
        let mut tags = HashSet::new();
        for tag in &scenario.tags {
            if !tags.insert(tag.value.as_str()) {
                self.report(
                    tag.at,
                    format!("tag `{tag}` is listed twice"),
                    "repeated",
                    None,
                );
            }
        }
        self.declare_products(scenario);
        self.declare_machines(scenario);
        self.declare_dongles(scenario);
        for allowed in &scenario.allowed_by_policy {
            self.allowed_by_policy(scenario, allowed);
        }
        let mut guards = HashSet::new();
        for guard in &scenario.guards {
            if !guards.insert(guard.value) {
                self.report(
                    guard.at,
                    "defence listed twice in `guards`",
                    "repeated",
                    None,
                );
            }
        }
    }

    /// An `allowed-by-policy` entry names a product of the policy and a field it really has.
    fn allowed_by_policy(&mut self, scenario: &Scenario, allowed: &AllowedByPolicy) {
        let code = allowed.product.value;
        let Some(product) = scenario
            .policy
            .products
            .iter()
            .find(|p| p.code.value == code)
        else {
            self.report(
                allowed.product.at,
                format!("product {code} is not in the policy"),
                "unknown product",
                None,
            );
            return;
        };
        let Some((field, value)) = allowed.policy.value.split_once(':') else {
            self.report(
                allowed.policy.at,
                format!("`{}` is not `field: value`", allowed.policy),
                "not field: value",
                Some("e.g. `policy: \"witness: optional\"`".into()),
            );
            return;
        };
        let (field, value) = (field.trim(), value.trim());
        let fields = serde_json::to_value(product).unwrap_or_default();
        match fields.get(field) {
            Some(serde_json::Value::String(actual)) if actual == value => {}
            Some(serde_json::Value::Number(actual)) if actual.to_string() == value => {}
            Some(actual) => self.report(
                allowed.policy.at,
                format!(
                    "product {code} has `{field}: {}`, not `{value}`",
                    actual
                        .as_str()
                        .map_or_else(|| actual.to_string(), str::to_owned)
                ),
                "not the product's policy",
                None,
            ),
            None => self.report(
                allowed.policy.at,
                format!("product {code} does not set `{field}`"),
                "no such field",
                Some("name a field the product sets (defaults are written out)".into()),
            ),
        }
    }

    fn declare_products(&mut self, scenario: &Scenario) {
        self.declare_policy(&scenario.policy);
    }

    fn declare_policy(&mut self, policy: &super::Policy) {
        if policy.products.is_empty() {
            self.report(
                Position::default(),
                "the policy has no products",
                "here",
                Some("add at least one product under `policy: products:`".to_owned()),
            );
        }
        let mut names: HashMap<&str, Position> = HashMap::new();
        for product in &policy.products {
            let code = product.code.value;
            if self.products.contains_key(&code) {
                self.report(
                    product.code.at,
                    format!("duplicate product code {code}"),
                    "already used",
                    None,
                );
                continue;
            }
            if let Some(first) = names.insert(&product.name.value, product.name.at) {
                self.report(
                    product.name.at,
                    format!(
                        "duplicate product name `{}`; first used at line {}",
                        product.name, first.line
                    ),
                    "already used",
                    None,
                );
            }
            if product.units == Some(0) {
                self.report(
                    product.code.at,
                    format!("product {code} has `units: 0`: nothing could ever be granted"),
                    "no units",
                    Some("give at least one unit, or drop `units` for an unmetered item".into()),
                );
            }
            if product.witness.value == WitnessPolicy::Required
                && (product.units.is_none() || product.container != Container::Soft)
            {
                self.report(
                    product.witness.at,
                    format!("product {code} has `witness: required` but spends no soft units"),
                    "nothing to witness",
                    Some(
                        "`witness: required` is for soft-licence items with `units`; drop it or \
                         add `units`"
                            .into(),
                    ),
                );
            }
            self.products.insert(
                code,
                ProductInfo {
                    name: product.name.value.clone(),
                    container: product.container,
                    metered: product.units.is_some(),
                },
            );
            self.product_order.push(code);
        }
    }

    /// Reports a declared name that could not safely become a file name.
    fn safe_name(&mut self, name: &Name, what: &str) -> bool {
        match crate::name::check(&name.value) {
            Ok(()) => true,
            Err(error) => {
                let label = match error {
                    crate::name::NameError::Empty => "empty name",
                    crate::name::NameError::TooLong { .. } => "too long",
                    _ => "not allowed in a name",
                };
                self.report(
                    name.at,
                    format!("{error} (this {what} name becomes a file name)"),
                    label,
                    Some(format!(
                        "names are 1 to {} letters, digits, `.`, `_` or `-`, starting with a letter or digit",
                        crate::name::NAME_MAX_LEN
                    )),
                );
                false
            }
        }
    }

    fn declare_machine(
        &mut self,
        name: &Name,
        kind: Kind,
        role: Role,
        host: Option<String>,
    ) -> bool {
        self.safe_name(name, "machine");
        if let Some(existing) = self.machines.get(&name.value) {
            let line = existing.declared.line;
            self.report(
                name.at,
                format!("duplicate machine name `{name}`; first defined at line {line}"),
                "already defined",
                Some("every host and guest (clones included) needs its own name".into()),
            );
            return false;
        }
        let (power, power_note) = match kind {
            Kind::Host => (Power::Running, "hosts are always up".to_owned()),
            Kind::Guest => (Power::Off, "it was never booted".to_owned()),
        };
        self.machines.insert(
            name.value.clone(),
            Machine {
                kind,
                role,
                host,
                declared: name.at,
                power,
                power_note,
            },
        );
        self.machine_order.push(name.value.clone());
        true
    }

    fn declare_machines(&mut self, scenario: &Scenario) {
        let mut macs: HashMap<String, Position> = HashMap::new();
        for host in &scenario.hosts {
            self.declare_machine(&host.name, Kind::Host, host.role, None);
            self.check_identity(&host.name, &host.identity, &mut macs);
        }
        let hosts: Vec<String> = scenario
            .hosts
            .iter()
            .map(|h| h.name.value.clone())
            .collect();
        for guest in &scenario.guests {
            self.check_identity(&guest.name, &guest.identity, &mut macs);
            if !hosts.contains(&guest.host.value) {
                let message = if self.machines.contains_key(&guest.host.value) {
                    format!("`{}` is a guest, not a host", guest.host)
                } else {
                    format!("unknown host `{}`; known: {}", guest.host, listing(&hosts))
                };
                self.report(guest.host.at, message, "not a host", None);
            }
            self.declare_machine(
                &guest.name,
                Kind::Guest,
                guest.role,
                Some(guest.host.value.clone()),
            );
        }
        for step in &scenario.steps {
            if let Step::Clone(clone) = &step.value {
                self.future_clones
                    .entry(clone.to.value.clone())
                    .or_insert(clone.to.at);
            }
        }
    }

    /// Checks a machine's given identity: MACs well formed and unique, no reserved disk serial.
    fn check_identity(
        &mut self,
        machine: &Name,
        identity: &super::model::Identity,
        macs: &mut HashMap<String, Position>,
    ) {
        self.check_macs(&identity.macs, macs);
        if identity
            .disk_serials
            .iter()
            .any(|s| s == vigil_agent::protocol::RUNTIME_DISK_SERIAL)
        {
            self.report(
                machine.at,
                format!(
                    "`{machine}` has the disk serial `{}`, which the harness keeps for the runtime disk of `--runtime`",
                    vigil_agent::protocol::RUNTIME_DISK_SERIAL
                ),
                "reserved disk serial",
                Some("give the disk another serial".into()),
            );
        }
    }

    fn check_macs(&mut self, list: &[Located<String>], seen: &mut HashMap<String, Position>) {
        for mac in list {
            let parts: Vec<&str> = mac.value.split(':').collect();
            let well_formed = parts.len() == 6
                && parts
                    .iter()
                    .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
            if !well_formed {
                self.report(
                    mac.at,
                    format!("`{mac}` is not a MAC address"),
                    "not a MAC",
                    Some("write six hex pairs separated by colons, e.g. 52:54:00:12:34:56".into()),
                );
                continue;
            }
            let key = mac.value.to_ascii_lowercase();
            if let Some(first) = seen.insert(key, mac.at) {
                self.report(
                    mac.at,
                    format!("MAC `{mac}` is already used at line {}", first.line),
                    "duplicate",
                    Some("use `clone` with `identity: perfect` to copy an identity".into()),
                );
            }
        }
    }

    fn declare_dongles(&mut self, scenario: &Scenario) {
        let mut carried: HashSet<u32> = HashSet::new();
        let mut serials: HashMap<&str, Position> = HashMap::new();
        for dongle in &scenario.dongles {
            self.safe_name(&dongle.name, "dongle");
            if self.dongles.contains_key(&dongle.name.value) {
                self.report(
                    dongle.name.at,
                    format!("duplicate dongle name `{}`", dongle.name),
                    "already defined",
                    None,
                );
                continue;
            }
            if let Some(serial) = &dongle.serial
                && let Some(first) = serials.insert(serial, dongle.name.at)
            {
                self.report(
                    dongle.name.at,
                    format!(
                        "dongle serial `{serial}` is already used at line {}",
                        first.line
                    ),
                    "duplicate serial",
                    None,
                );
            }
            if dongle.products.is_empty() {
                self.report(
                    dongle.name.at,
                    format!("dongle `{}` carries no products", dongle.name),
                    "empty",
                    Some("list product codes under `products:`".into()),
                );
            }
            for code in &dongle.products {
                if let Some(product) = self.product(code) {
                    if product.container != Container::Dongle {
                        self.report(
                            code.at,
                            format!(
                                "product {} (`{}`) is a soft licence; a dongle carries `container: dongle` products",
                                code.value, product.name
                            ),
                            "not a dongle product",
                            None,
                        );
                    }
                    carried.insert(code.value);
                }
            }
            if dongle.policy.max_rebinds == 0 {
                self.report(
                    dongle.name.at,
                    "`max-rebinds: 0` would lock the dongle out on its first bind",
                    "here",
                    None,
                );
            }
            self.dongles
                .insert(dongle.name.value.clone(), Attachment::Unplugged);
            self.dongle_order.push(dongle.name.value.clone());
        }
        for product in &scenario.policy.products {
            if product.container == Container::Dongle && !carried.contains(&product.code.value) {
                self.report(
                    product.code.at,
                    format!(
                        "product {} is a dongle product but no dongle carries it",
                        product.code.value
                    ),
                    "on no dongle",
                    Some(format!(
                        "add {} to a dongle's `products`",
                        product.code.value
                    )),
                );
            }
        }
    }

    // ---- references ---------------------------------------------------------------------

    fn product(&mut self, code: &ProductCode) -> Option<ProductInfo> {
        if let Some(info) = self.products.get(&code.value) {
            return Some(info.clone());
        }
        let known: Vec<String> = self
            .product_order
            .iter()
            .map(|c| format!("{c} ({})", self.products[c].name))
            .collect();
        self.report(
            code.at,
            format!("unknown product {}; known: {}", code.value, listing(&known)),
            "not in the policy",
            None,
        );
        None
    }

    fn soft_product(&mut self, code: &ProductCode) {
        if let Some(product) = self.product(code)
            && product.container != Container::Soft
        {
            self.report(
                code.at,
                format!(
                    "product {} (`{}`) lives on a dongle; only soft licences are activated or copied",
                    code.value, product.name
                ),
                "a dongle product",
                None,
            );
        }
    }

    fn machine(&mut self, name: &Name) -> Option<Machine> {
        if let Some(machine) = self.machines.get(&name.value) {
            return Some(machine.clone());
        }
        let known = listing(&self.machine_order);
        match self.future_clones.get(&name.value) {
            Some(created) => {
                let line = created.line;
                self.report(
                    name.at,
                    format!(
                        "machine `{name}` does not exist yet: it is created by the `clone` at line {line}"
                    ),
                    "not created yet",
                    Some(format!("known at this step: {known}")),
                );
            }
            None => self.report(
                name.at,
                format!("unknown machine `{name}`; known: {known}"),
                "not defined",
                None,
            ),
        }
        None
    }

    fn guest(&mut self, name: &Name, step: &str) -> Option<Machine> {
        let machine = self.machine(name)?;
        if machine.kind == Kind::Host {
            let guests: Vec<&String> = self
                .machine_order
                .iter()
                .filter(|m| self.machines[*m].kind == Kind::Guest)
                .collect();
            self.report(
                name.at,
                format!(
                    "`{name}` is a host; `{step}` applies to guests: {}",
                    listing(guests)
                ),
                "a host",
                None,
            );
            return None;
        }
        Some(machine)
    }

    fn host(&mut self, name: &Name) -> bool {
        match self.machines.get(&name.value) {
            Some(machine) if machine.kind == Kind::Host => true,
            Some(_) => {
                self.report(
                    name.at,
                    format!("`{name}` is a guest, not a host"),
                    "not a host",
                    Some(format!("hosts: {}", listing(self.host_names()))),
                );
                false
            }
            None => {
                let hosts = listing(self.host_names());
                self.report(
                    name.at,
                    format!("unknown host `{name}`; known: {hosts}"),
                    "not defined",
                    None,
                );
                false
            }
        }
    }

    fn host_names(&self) -> Vec<&String> {
        self.machine_order
            .iter()
            .filter(|m| self.machines[*m].kind == Kind::Host)
            .collect()
    }

    /// The machine exists and is running (hosts always are).
    /// The machine, if it is running or paused (powered on); reports it when it is off.
    fn powered(&mut self, name: &Name) -> Option<Machine> {
        let machine = self.machine(name)?;
        if machine.power == Power::Off {
            return self.running(name);
        }
        Some(machine)
    }

    /// Checks that `name` runs and is a member of a triad formed by now (an attack staged on
    /// a member's runtime).
    fn triad_member(&mut self, name: &Name) {
        self.running(name);
        if !self.triad_members.contains(&name.value) {
            self.report(
                name.at,
                format!("`{name}` is no triad member at this step"),
                "not a member",
                Some("form the triad first: `triad: [a, b, c]`".into()),
            );
        }
    }

    fn running(&mut self, name: &Name) -> Option<Machine> {
        let machine = self.machine(name)?;
        match machine.power {
            Power::Running => Some(machine),
            Power::Off => {
                self.report(
                    name.at,
                    format!(
                        "machine `{name}` is not running at this step: {}",
                        machine.power_note
                    ),
                    "not running",
                    Some(format!("add `- boot: {name}` before this step")),
                );
                None
            }
            Power::Paused => {
                self.report(
                    name.at,
                    format!(
                        "machine `{name}` is paused at this step: {}",
                        machine.power_note
                    ),
                    "paused",
                    Some(format!("add `- resume: {name}` before this step")),
                );
                None
            }
        }
    }

    fn dongle(&mut self, name: &Name) -> Option<Attachment> {
        if let Some(attachment) = self.dongles.get(&name.value) {
            return Some(attachment.clone());
        }
        let known = listing(&self.dongle_order);
        self.report(
            name.at,
            format!("unknown dongle `{name}`; known: {known}"),
            "not defined",
            None,
        );
        None
    }

    fn session(&mut self, name: &Name, machine: &str) -> bool {
        let Some(session) = self.sessions.get(&name.value).cloned() else {
            let known = listing(&self.session_order);
            self.report(
                name.at,
                format!("unknown session `{name}`; known: {known}"),
                "not opened",
                Some("open it first with `session-open: { machine, as, user }`".into()),
            );
            return false;
        };
        if !session.open {
            self.report(
                name.at,
                format!(
                    "session `{name}` is closed at this step: {}",
                    session.end_note
                ),
                "closed",
                None,
            );
            return false;
        }
        if session.machine != machine {
            self.report(
                name.at,
                format!(
                    "session `{name}` is on `{}`, not on `{machine}`",
                    session.machine
                ),
                "other machine",
                None,
            );
            return false;
        }
        true
    }

    /// A name for an app, access or session that must be new.
    fn fresh_name(&mut self, name: &Name, what: &str) -> bool {
        if !self.safe_name(name, what) {
            return false;
        }
        let earlier = self
            .apps
            .get(&name.value)
            .map(|a| a.declared)
            .or_else(|| self.sessions.get(&name.value).map(|s| s.declared));
        if let Some(first) = earlier {
            self.report(
                name.at,
                format!(
                    "the name `{name}` is already used at line {}; give this {what} its own name",
                    first.line
                ),
                "already used",
                None,
            );
            return false;
        }
        true
    }

    fn app(&mut self, name: &Name, accesses_too: bool) -> Option<App> {
        match self.apps.get(&name.value) {
            Some(app) if accesses_too || app.kind == AppKind::App => Some(app.clone()),
            Some(_) => {
                self.report(
                    name.at,
                    format!("`{name}` is a one-shot `access`, not an app started with `start-app`"),
                    "an access",
                    None,
                );
                None
            }
            None => {
                let known: Vec<&String> = self
                    .app_order
                    .iter()
                    .filter(|a| accesses_too || self.apps[*a].kind == AppKind::App)
                    .collect();
                let what = if accesses_too { "app or access" } else { "app" };
                self.report(
                    name.at,
                    format!("unknown {what} `{name}`; known: {}", listing(known)),
                    "not started",
                    Some("name it with `as:` in `start-app` (or `access`) before this step".into()),
                );
                None
            }
        }
    }

    // ---- state changes -------------------------------------------------------------------

    fn stop_machine(&mut self, machine: &str, power: Power, note: String) {
        if let Some(m) = self.machines.get_mut(machine) {
            m.power = power;
            m.power_note = note.clone();
        }
        for app in self.apps.values_mut() {
            if app.machine == machine && app.live {
                app.live = false;
                app.end_note = note.clone();
            }
        }
        for session in self.sessions.values_mut() {
            if session.machine == machine && session.open {
                session.open = false;
                session.end_note = note.clone();
            }
        }
        self.servers.retain(|s| s != machine);
    }

    fn set_power(&mut self, machine: &str, power: Power, note: String) {
        if let Some(m) = self.machines.get_mut(machine) {
            m.power = power;
            m.power_note = note;
        }
    }

    // ---- steps --------------------------------------------------------------------------

    fn steps(&mut self, scenario: &Scenario) {
        if scenario.steps.is_empty() {
            self.report(
                scenario.name.at,
                "the scenario has no steps",
                "no steps",
                Some("add `steps:` with at least one step".into()),
            );
        }
        for step in &scenario.steps {
            self.step(step);
        }
    }

    fn step(&mut self, step: &Located<Step>) {
        let line = step.at.line;
        match &step.value {
            Step::Boot(name) => {
                if let Some(machine) = self.guest(name, "boot") {
                    match machine.power {
                        Power::Off => {
                            self.set_power(name, Power::Running, format!("booted at line {line}"))
                        }
                        Power::Running => self.report(
                            name.at,
                            format!("`{name}` is already running: {}", machine.power_note),
                            "already running",
                            None,
                        ),
                        Power::Paused => self.report(
                            name.at,
                            format!("`{name}` is paused: {}", machine.power_note),
                            "paused",
                            Some(format!("use `- resume: {name}`")),
                        ),
                    }
                }
            }
            Step::Shutdown(name) => {
                if let Some(machine) = self.guest(name, "shutdown") {
                    if machine.power == Power::Off {
                        self.report(
                            name.at,
                            format!("`{name}` is not running: {}", machine.power_note),
                            "already off",
                            None,
                        );
                    } else {
                        self.stop_machine(name, Power::Off, format!("shut down at line {line}"));
                    }
                }
            }
            Step::Pause(name) => {
                if self.guest(name, "pause").is_some() && self.running(name).is_some() {
                    self.set_power(name, Power::Paused, format!("paused at line {line}"));
                }
            }
            Step::Resume(name) => {
                if let Some(machine) = self.guest(name, "resume") {
                    if machine.power == Power::Paused {
                        self.set_power(name, Power::Running, format!("resumed at line {line}"));
                    } else {
                        self.report(
                            name.at,
                            format!("`{name}` is not paused: {}", machine.power_note),
                            "not paused",
                            None,
                        );
                    }
                }
            }
            Step::Snapshot(snapshot) => {
                let named = self.safe_name(&snapshot.name, "snapshot");
                if let Some(machine) = self.guest(&snapshot.machine, "snapshot")
                    && named
                {
                    let taken = self
                        .snapshots
                        .entry(snapshot.machine.value.clone())
                        .or_default();
                    if taken.iter().any(|(n, _)| *n == snapshot.name.value) {
                        let message = format!(
                            "`{}` already has a snapshot named `{}`",
                            snapshot.machine, snapshot.name
                        );
                        self.report(snapshot.name.at, message, "already taken", None);
                    } else {
                        taken.push((snapshot.name.value.clone(), machine.power));
                    }
                }
            }
            Step::Revert(revert) => {
                if self.guest(&revert.machine, "revert").is_some() {
                    let taken = self
                        .snapshots
                        .get(&revert.machine.value)
                        .cloned()
                        .unwrap_or_default();
                    match taken.iter().find(|(n, _)| *n == revert.snapshot.value) {
                        Some((_, power)) => {
                            let note = format!("reverted at line {line}");
                            self.stop_machine(&revert.machine, *power, note);
                        }
                        None => {
                            let names: Vec<&String> = taken.iter().map(|(n, _)| n).collect();
                            self.report(
                                revert.snapshot.at,
                                format!(
                                    "unknown snapshot `{}` of `{}`; known: {}",
                                    revert.snapshot,
                                    revert.machine,
                                    listing(names)
                                ),
                                "no such snapshot",
                                Some("take it earlier with `snapshot: { machine, name }`".into()),
                            );
                        }
                    }
                }
            }
            Step::Clone(clone) => {
                let source = self.guest(&clone.from, "clone");
                let host = match &clone.host {
                    Some(host) => self.host(host).then(|| host.value.clone()),
                    None => source.as_ref().and_then(|s| s.host.clone()),
                };
                if let Some(source) = source {
                    self.future_clones.remove(&clone.to.value);
                    if self.declare_machine(&clone.to, Kind::Guest, source.role, host) {
                        self.set_power(
                            &clone.to,
                            Power::Off,
                            format!("it was cloned at line {line} and not booted since"),
                        );
                    }
                }
            }
            Step::Migrate(migrate) => {
                let machine = self.guest(&migrate.machine, "migrate");
                let host_ok = self.host(&migrate.host);
                if let Some(machine) = machine {
                    if machine.power == Power::Off {
                        self.report(
                            migrate.machine.at,
                            format!(
                                "`migrate` is a live migration but `{}` is not running: {}",
                                migrate.machine, machine.power_note
                            ),
                            "not running",
                            Some("boot it first, or use `move` for a cold move".into()),
                        );
                    } else if machine.host.as_deref() == Some(migrate.host.value.as_str()) {
                        self.report(
                            migrate.host.at,
                            format!("`{}` already runs on `{}`", migrate.machine, migrate.host),
                            "same host",
                            Some("use `move` to re-register a guest on its own host".into()),
                        );
                    } else if host_ok && let Some(m) = self.machines.get_mut(&migrate.machine.value)
                    {
                        m.host = Some(migrate.host.value.clone());
                    }
                }
            }
            Step::Move(move_step) => {
                let machine = self.guest(&move_step.machine, "move");
                let host_ok = self.host(&move_step.host);
                if let Some(machine) = machine {
                    if machine.power != Power::Off {
                        self.report(
                            move_step.machine.at,
                            format!(
                                "`move` is a cold move but `{}` is running: {}",
                                move_step.machine, machine.power_note
                            ),
                            "running",
                            Some(format!(
                                "add `- shutdown: {}` before this step, or use `migrate` for a live migration",
                                move_step.machine
                            )),
                        );
                    } else if host_ok
                        && let Some(m) = self.machines.get_mut(&move_step.machine.value)
                    {
                        m.host = Some(move_step.host.value.clone());
                    }
                }
            }
            Step::ReplacePart(replace) => {
                self.machine(&replace.machine);
            }
            Step::UsbAttach(attach) => self.usb_attach(attach),
            Step::UsbDetach(dongle) => {
                if let Some(attachment) = self.dongle(dongle) {
                    if matches!(attachment, Attachment::Usb(_)) {
                        self.dongles
                            .insert(dongle.value.clone(), Attachment::Unplugged);
                    } else {
                        self.not_attached(dongle, &attachment, "usb-attach");
                    }
                }
            }
            Step::UsbipAttach(attach) => {
                let attachment = self.dongle(&attach.dongle);
                let machine_ok = self.running(&attach.machine).is_some();
                if let Some(attachment) = attachment {
                    if attachment != Attachment::Unplugged {
                        self.already_attached(&attach.dongle, &attachment);
                    } else if machine_ok {
                        self.dongles.insert(
                            attach.dongle.value.clone(),
                            Attachment::Usbip(attach.machine.value.clone()),
                        );
                    }
                }
            }
            Step::UsbipDetach(dongle) | Step::UsbipDisconnect(dongle) => {
                if let Some(attachment) = self.dongle(dongle) {
                    if matches!(attachment, Attachment::Usbip(_)) {
                        self.dongles
                            .insert(dongle.value.clone(), Attachment::Unplugged);
                    } else {
                        self.not_attached(dongle, &attachment, "usbip-attach");
                    }
                }
            }
            Step::UsbHang(dongle) => {
                if let Some(attachment) = self.dongle(dongle)
                    && attachment == Attachment::Unplugged
                {
                    self.report(
                        dongle.at,
                        format!("dongle `{dongle}` is not attached; only a plugged-in dongle can hang"),
                        "not attached",
                        Some(format!(
                            "add `- usb-attach: {{ dongle: {dongle}, machine: … }}` before this step"
                        )),
                    );
                }
            }
            Step::SessionOpen(open) => self.session_open(open, line),
            Step::DropSessionTable(name) => {
                self.running(name);
            }
            Step::SessionClose(name) => match self.sessions.get(&name.value).cloned() {
                Some(session) if session.open => {
                    let note = format!("session `{name}` was closed at line {line}");
                    if let Some(s) = self.sessions.get_mut(&name.value) {
                        s.open = false;
                        s.end_note = note.clone();
                    }
                    for app in self.apps.values_mut() {
                        if app.session.as_deref() == Some(name.value.as_str()) && app.live {
                            app.live = false;
                            app.end_note = note.clone();
                        }
                    }
                }
                Some(session) => self.report(
                    name.at,
                    format!("session `{name}` is already closed: {}", session.end_note),
                    "closed",
                    None,
                ),
                None => {
                    let open: Vec<&String> = self
                        .session_order
                        .iter()
                        .filter(|s| self.sessions[*s].open)
                        .collect();
                    self.report(
                        name.at,
                        format!("unknown session `{name}`; open: {}", listing(open)),
                        "not opened",
                        None,
                    );
                }
            },
            Step::Activate(activate) => {
                self.running(&activate.machine);
                if let Some(name) = &activate.name
                    && self.fresh_name(name, "activation")
                {
                    self.add_app(name, AppKind::Access, &activate.machine, &None, line);
                }
                self.soft_product(&activate.product);
            }
            Step::ActivateTriad(activate) => {
                if activate.machines.len() != 3 {
                    self.report(
                        step.at,
                        format!(
                            "a triad licence is for three servers, not {}",
                            activate.machines.len()
                        ),
                        "three machines",
                        None,
                    );
                }
                for (i, machine) in activate.machines.iter().enumerate() {
                    if activate.machines[..i]
                        .iter()
                        .any(|m| m.value == machine.value)
                    {
                        self.report(
                            machine.at,
                            format!("`{machine}` is listed twice"),
                            "listed twice",
                            None,
                        );
                        continue;
                    }
                    self.running(machine);
                }
                if let Some(name) = &activate.name
                    && let Some(first) = activate.machines.first()
                    && self.fresh_name(name, "activation")
                {
                    self.add_app(name, AppKind::Access, first, &None, line);
                }
                self.soft_product(&activate.product);
            }
            Step::CopyLicence(copy) => {
                self.running(&copy.from);
                self.running(&copy.to);
                if copy.from.value == copy.to.value {
                    self.report(
                        copy.to.at,
                        "`copy-licence` copies to another machine",
                        "same machine",
                        None,
                    );
                }
                self.soft_product(&copy.product);
            }
            Step::ApplyAgain(again) => {
                self.running(&again.machine);
                self.soft_product(&again.product);
            }
            Step::ForgeLicence(forge) => {
                self.running(&forge.machine);
                self.soft_product(&forge.product);
                if !(1..=MAX_FORGED_QUANTITY).contains(&forge.quantity.value) {
                    self.report(
                        forge.quantity.at,
                        format!("`quantity: {}` is out of range", forge.quantity.value),
                        "out of range",
                        Some(format!(
                            "a forged licence names 1 to {MAX_FORGED_QUANTITY} seats"
                        )),
                    );
                }
            }
            Step::Access(access) => {
                let machine = self.running(&access.machine);
                self.product(&access.product);
                if let Some(times) = &access.times
                    && !(1..=MAX_ACCESS_TIMES).contains(&times.value)
                {
                    self.report(
                        times.at,
                        format!("`times: {}` is out of range", times.value),
                        "out of range",
                        Some(format!("give 1 to {MAX_ACCESS_TIMES}")),
                    );
                }
                if let (Some(session), Some(_)) = (&access.session, &machine) {
                    self.session(session, &access.machine.value);
                }
                if let Some(name) = &access.name
                    && self.fresh_name(name, "access")
                {
                    self.add_app(
                        name,
                        AppKind::Access,
                        &access.machine,
                        &access.session,
                        line,
                    );
                }
            }
            Step::StartApp(start) => {
                let machine = self.running(&start.machine);
                self.product(&start.product);
                if let (Some(session), Some(_)) = (&start.session, &machine) {
                    self.session(session, &start.machine.value);
                }
                if let Some(leave) = &start.leave_session
                    && leave.value
                    && start.session.is_none()
                {
                    self.report(
                        leave.at,
                        "`leave-session` needs a `session` to leave",
                        "no session",
                        Some("name the login session the app starts in (`session: <name>`)".into()),
                    );
                }
                if self.fresh_name(&start.name, "app") {
                    self.add_app(
                        &start.name,
                        AppKind::App,
                        &start.machine,
                        &start.session,
                        line,
                    );
                }
            }
            Step::ReleaseElsewhere(r) => {
                let name = &r.app;
                if let Some(app) = self.app(name, false) {
                    if !app.live {
                        self.report(
                            name.at,
                            format!("app `{name}` is no longer running: {}", app.end_note),
                            "already ended",
                            None,
                        );
                    }
                    if let Some(session) = &r.session {
                        self.session(session, &app.machine);
                    }
                }
            }
            Step::Release(name) | Step::Kill(name) => {
                let verb = step.value.keyword();
                if let Some(app) = self.app(name, false) {
                    if app.live {
                        let killed = matches!(step.value, Step::Kill(_));
                        if let Some(a) = self.apps.get_mut(&name.value) {
                            a.live = false;
                            a.killed = killed;
                            a.end_note = format!("it ended with `{verb}` at line {line}");
                        }
                    } else {
                        self.report(
                            name.at,
                            format!("app `{name}` is no longer running: {}", app.end_note),
                            "already ended",
                            None,
                        );
                    }
                }
            }
            Step::Advance(duration) => {
                let total = self
                    .advanced
                    .as_millis()
                    .saturating_add(duration.as_millis());
                if total > super::MAX_SPAN.as_millis() {
                    self.report(
                        duration.at,
                        format!(
                            "this advance takes the world clock {} past its start, more than {} in total",
                            super::Duration::from_millis(total),
                            super::MAX_SPAN
                        ),
                        "too far",
                        Some("the advances of a scenario add up to at most 36500d (100 years)".into()),
                    );
                } else {
                    self.advanced = super::Duration::from_millis(total);
                }
                if duration.is_zero() {
                    self.report(
                        duration.at,
                        "`advance: 0s` does nothing",
                        "zero",
                        Some("advance by a positive duration, e.g. 5m".into()),
                    );
                }
            }
            Step::SetClock(set) => {
                self.machine(&set.machine);
            }
            Step::Partition(partition) => {
                self.machine_list(&partition.machines, "partition");
                if partition.machines.len() < 2 {
                    self.report(
                        step.at,
                        "`partition` needs at least two machines",
                        "too few machines",
                        None,
                    );
                }
            }
            Step::Heal(heal) => self.machine_list(&heal.machines, "heal"),
            Step::Wait(duration) => {
                if duration.is_zero() || duration.value > super::Duration::from_secs(600) {
                    self.report(
                        duration.at,
                        "`wait` lets between 1 ms and 10 minutes of real time pass",
                        "wait",
                        Some("e.g. `wait: 3s`; to move clocks forward use `advance`".into()),
                    );
                }
            }
            Step::StateSave(save) => {
                let named = self.safe_name(&save.name, "state copy");
                if self.running(&save.machine).is_some() && named {
                    let saved = self
                        .state_copies
                        .entry(save.machine.value.clone())
                        .or_default();
                    if saved.contains(&save.name.value) {
                        let message = format!(
                            "`{}` already has a state copy named `{}`",
                            save.machine, save.name
                        );
                        self.report(save.name.at, message, "already taken", None);
                    } else {
                        saved.push(save.name.value.clone());
                    }
                }
            }
            Step::StateRestore(restore) => {
                if self.running(&restore.machine).is_some() {
                    let saved = self
                        .state_copies
                        .get(&restore.machine.value)
                        .cloned()
                        .unwrap_or_default();
                    if !saved.contains(&restore.name.value) {
                        self.report(
                            restore.name.at,
                            format!(
                                "unknown state copy `{}` of `{}`; known: {}",
                                restore.name,
                                restore.machine,
                                listing(&saved)
                            ),
                            "no such copy",
                            Some("save it earlier with `state-save: { machine, name }`".into()),
                        );
                    }
                }
            }
            Step::Impersonate(imp) => {
                self.running(&imp.machine);
                self.running(&imp.victim);
                if imp.machine.value == imp.victim.value {
                    self.report(
                        imp.victim.at,
                        "a machine cannot impersonate itself",
                        "same machine",
                        None,
                    );
                }
            }
            Step::InflateSeats(inflate) => {
                self.triad_member(&inflate.machine);
                if inflate.quantity.value == 0 {
                    self.report(
                        inflate.quantity.at,
                        "a licence of 0 seats claims nothing",
                        "0",
                        Some("`quantity: 3`, more than the licence has".into()),
                    );
                }
            }
            Step::ReleaseMemberSeats(machine) => self.triad_member(machine),
            Step::Rules(r) => {
                self.running(&r.machine);
            }
            Step::TamperUsageLog(t) => {
                self.running(&t.machine);
                if t.record.value == 0 {
                    self.report(
                        t.record.at,
                        "usage records are counted from 1",
                        "no record 0",
                        Some("`record: 1` is the first record".into()),
                    );
                }
            }
            Step::ClaimWitness(claim) => {
                self.running(&claim.machine);
                self.running(&claim.victim);
                self.soft_product(&claim.product);
                if self.servers.is_empty() {
                    self.report(
                        claim.machine.at,
                        "no network server runs at this step to witness the claim",
                        "no witness",
                        Some("add `- server-start: { machine: <host> }` before this step".into()),
                    );
                }
                if claim.machine.value == claim.victim.value {
                    self.report(
                        claim.victim.at,
                        "a machine cannot claim its own licence",
                        "same machine",
                        None,
                    );
                }
            }
            Step::Flood(flood) => {
                self.machine(&flood.from);
                if self.running(&flood.to).is_some() && !self.servers.contains(&flood.to.value) {
                    self.report(
                        flood.to.at,
                        format!("`{}` runs no network server at this step", flood.to),
                        "no server",
                        Some(format!(
                            "add `- server-start: {{ machine: {} }}` before this step",
                            flood.to
                        )),
                    );
                }
                let n = flood.connections.value;
                if n == 0 || n > super::model::MAX_FLOOD_CONNECTIONS {
                    self.report(
                        flood.connections.at,
                        format!(
                            "`connections` is between 1 and {}",
                            super::model::MAX_FLOOD_CONNECTIONS
                        ),
                        "connections",
                        None,
                    );
                }
            }
            Step::ServerStart(start) => {
                if self.running(&start.machine).is_some() {
                    if self.servers.contains(&start.machine.value) {
                        self.report(
                            start.machine.at,
                            format!("`{}` already runs a server", start.machine),
                            "already serving",
                            None,
                        );
                    } else {
                        self.servers.push(start.machine.value.clone());
                    }
                }
                if start.port == Some(0) {
                    self.report(step.at, "`port: 0` is not a port", "port", None);
                }
                if start.keepalive.is_some_and(|k| k.is_zero()) {
                    self.report(
                        step.at,
                        "`keepalive: 0s` would drop every station",
                        "keepalive",
                        None,
                    );
                }
            }
            Step::ServerCrash(name) => {
                if self.machine(name).is_some() && self.serving(name) {
                    // Killed and started again: it runs.
                    self.paused_servers.retain(|s| *s != name.value);
                }
            }
            Step::ServerPause(name) => {
                if self.machine(name).is_some() && self.serving(name) {
                    if self.paused_servers.contains(&name.value) {
                        self.report(
                            name.at,
                            format!("the server of `{name}` is paused already"),
                            "paused",
                            None,
                        );
                    } else {
                        self.paused_servers.push(name.value.clone());
                    }
                }
            }
            Step::ServerResume(name) => {
                if self.machine(name).is_some() && self.serving(name) {
                    if self.paused_servers.contains(&name.value) {
                        self.paused_servers.retain(|s| *s != name.value);
                    } else {
                        self.report(
                            name.at,
                            format!(
                                "the server of `{name}` is not paused (`server-pause` it first)"
                            ),
                            "not paused",
                            None,
                        );
                    }
                }
            }
            Step::Triad(members) => {
                if members.len() != 3 {
                    self.report(
                        step.at,
                        format!("a triad has three members, not {}", members.len()),
                        "three members",
                        None,
                    );
                }
                for (i, member) in members.iter().enumerate() {
                    if members[..i].iter().any(|m| m.value == member.value) {
                        self.report(
                            member.at,
                            format!("`{member}` is listed twice"),
                            "listed twice",
                            None,
                        );
                        continue;
                    }
                    if self.triad_members.contains(&member.value) {
                        self.report(
                            member.at,
                            format!("`{member}` is a member of a triad already"),
                            "in a triad",
                            None,
                        );
                    }
                    if self.machine(member).is_some() && self.serving(member) {
                        self.triad_members.push(member.value.clone());
                    }
                }
            }
            Step::ServerStop(name) => {
                if self.machine(name).is_some() && self.serving(name) {
                    self.servers.retain(|s| *s != name.value);
                    self.paused_servers.retain(|s| *s != name.value);
                }
            }
            Step::Expect(assertion) => self.expect(assertion, step.at),
        }
    }

    /// Whether `name` runs a server at this step; reported when it does not.
    fn serving(&mut self, name: &Name) -> bool {
        if self.servers.contains(&name.value) {
            return true;
        }
        let running = listing(&self.servers);
        self.report(
            name.at,
            format!("`{name}` runs no server at this step; servers running: {running}"),
            "no server",
            None,
        );
        false
    }

    fn add_app(
        &mut self,
        name: &Name,
        kind: AppKind,
        machine: &Name,
        session: &Option<Name>,
        line: u32,
    ) {
        self.apps.insert(
            name.value.clone(),
            App {
                kind,
                machine: machine.value.clone(),
                session: session.as_ref().map(|s| s.value.clone()),
                declared: name.at,
                live: kind == AppKind::App,
                end_note: format!("it was a one-shot access at line {line}"),
                killed: false,
            },
        );
        self.app_order.push(name.value.clone());
    }

    fn machine_list(&mut self, machines: &[Name], step: &str) {
        let mut seen = HashSet::new();
        for name in machines {
            self.machine(name);
            if !seen.insert(name.value.as_str()) {
                self.report(
                    name.at,
                    format!("`{name}` is listed twice in `{step}`"),
                    "repeated",
                    None,
                );
            }
        }
    }

    fn already_attached(&mut self, dongle: &Name, attachment: &Attachment) {
        let message = match attachment {
            Attachment::Usb(machines) => format!(
                "dongle `{dongle}` is already plugged into {}",
                listing(machines)
            ),
            Attachment::Usbip(machine) => {
                format!("dongle `{dongle}` is already attached to `{machine}` over USB/IP")
            }
            Attachment::Unplugged => return,
        };
        let help = match attachment {
            Attachment::Usbip(_) => format!("detach it first with `- usbip-detach: {dongle}`"),
            _ => format!("unplug it first with `- usb-detach: {dongle}`"),
        };
        self.report(dongle.at, message, "attached elsewhere", Some(help));
    }

    fn not_attached(&mut self, dongle: &Name, attachment: &Attachment, how: &str) {
        let state = match attachment {
            Attachment::Unplugged => "is not attached".to_owned(),
            Attachment::Usb(machines) => {
                format!("is plugged in by USB (into {})", listing(machines))
            }
            Attachment::Usbip(machine) => format!("is attached over USB/IP to `{machine}`"),
        };
        self.report(
            dongle.at,
            format!("dongle `{dongle}` {state}; this step undoes a `{how}`"),
            "not attached that way",
            None,
        );
    }

    fn usb_attach(&mut self, attach: &super::model::UsbAttachStep) {
        let attachment = self.dongle(&attach.dongle);
        let targets = attach.targets();
        match (attach.mode, &attach.machine, attach.machines.len()) {
            (_, Some(_), n) if n > 0 => self.report(
                attach.dongle.at,
                "give either `machine` (exclusive) or `machines` (shared), not both",
                "both given",
                None,
            ),
            (_, None, 0) => self.report(
                attach.dongle.at,
                "`usb-attach` needs `machine` (exclusive) or `machines` (shared)",
                "no machine",
                None,
            ),
            (UsbMode::Exclusive, None, n) if n > 1 => self.report(
                attach.machines[1].at,
                "an exclusive attach goes to one machine",
                "second machine",
                Some("add `mode: shared` to plug the dongle into several machines at once".into()),
            ),
            (UsbMode::Shared, _, n) if n < 2 => self.report(
                attach.dongle.at,
                "a shared attach needs `machines:` with at least two machines",
                "one machine",
                Some("drop `mode: shared` for an exclusive attach".into()),
            ),
            _ => {}
        }
        // A paused guest can be given a device: it appears when the guest resumes.
        let mut all_running = true;
        let mut seen = HashSet::new();
        for target in &targets {
            all_running &= self.powered(target).is_some();
            if !seen.insert(target.value.as_str()) {
                self.report(
                    target.at,
                    format!("`{target}` is listed twice"),
                    "repeated",
                    None,
                );
            }
        }
        if let Some(attachment) = attachment {
            if attachment != Attachment::Unplugged {
                self.already_attached(&attach.dongle, &attachment);
            } else if all_running && !targets.is_empty() {
                self.dongles.insert(
                    attach.dongle.value.clone(),
                    Attachment::Usb(targets.iter().map(|t| t.value.clone()).collect()),
                );
            }
        }
    }

    fn session_open(&mut self, open: &super::model::SessionOpenStep, line: u32) {
        let machine = self.running(&open.machine);
        match open.kind {
            SessionKind::Rdp => {
                if open.client_name.is_none() || open.client_ip.is_none() {
                    self.report(
                        open.name.at,
                        "an rdp session needs `client-name` and `client-ip`",
                        "rdp session",
                        Some("e.g. `client-name: pc-7, client-ip: 10.0.0.7`".into()),
                    );
                }
            }
            SessionKind::Console => {
                if open.client_name.is_some() || open.client_ip.is_some() {
                    self.report(
                        open.name.at,
                        "a console session has no client; `client-name` and `client-ip` are for `kind: rdp`",
                        "console session",
                        None,
                    );
                }
            }
        }
        if !crate::name::is_user(&open.user.value) {
            self.report(
                open.user.at,
                format!(
                    "`user: {}` is not an account name (it becomes one on the machine)",
                    open.user.value.escape_default()
                ),
                "bad user",
                Some(format!(
                    "a lower-case letter or `_`, then up to 31 lower-case letters, digits, `_` or `-` ({})",
                    crate::name::USER_PATTERN
                )),
            );
        }
        if let Some(machine) = &machine
            && machine.role == Role::Workstation
        {
            let busy = self
                .session_order
                .iter()
                .find(|s| {
                    let s = &self.sessions[*s];
                    s.open && s.machine == open.machine.value
                })
                .cloned();
            if let Some(busy) = busy {
                self.report(
                    open.machine.at,
                    format!(
                        "workstation `{}` already has session `{busy}` open; only terminal servers hold several sessions",
                        open.machine
                    ),
                    "workstation busy",
                    Some(format!(
                        "close it first with `- session-close: {busy}`, or give the machine `role: terminal-server`"
                    )),
                );
            }
        }
        if self.fresh_name(&open.name, "session") {
            self.sessions.insert(
                open.name.value.clone(),
                Session {
                    machine: open.machine.value.clone(),
                    declared: open.name.at,
                    open: machine.is_some(),
                    end_note: format!("opened at line {line} on a machine that was not running"),
                },
            );
            self.session_order.push(open.name.value.clone());
        }
    }

    fn expect(&mut self, assertion: &Assertion, at: Position) {
        match assertion {
            Assertion::Holders(holders) => {
                self.product(&holders.product);
            }
            Assertion::SeatHistory(history) => {
                self.product(&history.product);
                if self.triad_members.is_empty() && self.servers.is_empty() {
                    self.report(
                        history.product.at,
                        "`seat-history` reads the servers' seats, and no server runs at this step",
                        "no server",
                        Some(
                            "start one first (`server-start`), or form a triad: `triad: [a, b, c]`"
                                .into(),
                        ),
                    );
                }
            }
            Assertion::Responsive(machine) => {
                self.running(machine);
            }
            Assertion::UsageLog(log) => {
                self.running(&log.machine);
            }
            Assertion::Usage(usage) => {
                self.running(&usage.machine);
                self.product(&usage.product);
                if usage.grants.is_none()
                    && usage.denials.is_none()
                    && usage.peak.is_none()
                    && usage.held.is_none()
                {
                    self.report(
                        usage.product.at,
                        "`usage` needs a figure: `grants`, `denials`, `peak` or `held`",
                        "nothing to check",
                        None,
                    );
                }
                if let Some(reason) = &usage.reason
                    && usage.denials.is_none()
                {
                    self.report(
                        reason.at,
                        "`reason` counts denials: give `denials` with it",
                        "reason without denials",
                        None,
                    );
                }
                if let Some(user) = &usage.user
                    && usage.peak.is_some()
                {
                    self.report(
                        user.at,
                        "`peak` is the product's, for every user: leave `user` out or check another figure",
                        "peak of a user",
                        None,
                    );
                }
                if usage.tolerance.is_some() && usage.held.is_none() {
                    self.report(
                        usage.product.at,
                        "`tolerance` goes with `held`",
                        "tolerance without held",
                        None,
                    );
                }
            }
            Assertion::Granted { app } | Assertion::Denied { app, .. } => {
                self.app(app, true);
            }
            Assertion::InUse(in_use) => {
                self.product(&in_use.product);
                match &in_use.machine {
                    Some(machine) => {
                        self.running(machine);
                    }
                    None if self.servers.len() != 1 => {
                        let servers = listing(&self.servers);
                        self.report(
                            at,
                            format!(
                                "`in-use` without `machine` asks the one running server, but servers running here: {servers}"
                            ),
                            "which runtime?",
                            Some("name the machine whose runtime counts: `machine: <name>`".into()),
                        );
                    }
                    None => {}
                }
                if in_use.stations.is_none() && in_use.accesses.is_none() {
                    self.report(
                        in_use.product.at,
                        "`in-use` needs `stations`, `accesses` or both",
                        "nothing to check",
                        None,
                    );
                }
            }
            Assertion::Licence(licence) => {
                self.running(&licence.machine);
                self.product(&licence.product);
            }
            Assertion::Units(units) => {
                self.running(&units.machine);
                if let Some(product) = self.product(&units.product)
                    && !product.metered
                {
                    self.report(
                        units.product.at,
                        format!(
                            "product {} (`{}`) has no `units`; only pay-per-use items count units",
                            units.product.value, product.name
                        ),
                        "not metered",
                        None,
                    );
                }
            }
            Assertion::Dongle(dongle) => {
                self.dongle(&dongle.name);
                if let Some(machine) = &dongle.bound_to {
                    self.machine(machine);
                }
                match (&dongle.bound_to, dongle.state) {
                    (None, None) => self.report(
                        dongle.name.at,
                        "a `dongle` assertion needs `bound-to: <machine>` or `state`",
                        "nothing to check",
                        None,
                    ),
                    (Some(machine), Some(state)) if state != DongleState::Bound => self.report(
                        machine.at,
                        "`bound-to` contradicts the `state` given",
                        "contradiction",
                        Some("use `state: bound` with `bound-to`, or drop one".into()),
                    ),
                    _ => {}
                }
                if dongle.until.is_some() && dongle.state != Some(DongleState::LockedOut) {
                    self.report(
                        dongle.name.at,
                        "`until` is the remaining lockout and goes with `state: locked-out`",
                        "until",
                        None,
                    );
                }
            }
            Assertion::ReleasedWithin(released) => {
                if let Some(app) = self.app(&released.app, false)
                    && !app.killed
                {
                    self.report(
                        released.app.at,
                        format!(
                            "`released-within` times the release after a kill, but `{}` was not killed before this step",
                            released.app
                        ),
                        "not killed",
                        Some(format!("add `- kill: {}` before this step", released.app)),
                    );
                }
            }
            Assertion::App(app) => {
                self.app(&app.app, false);
                if let Some(reason) = &app.reason
                    && app.state != super::model::AppState::Revoked
                {
                    self.report(
                        reason.at,
                        "`reason` goes with `state: revoked`",
                        "reason",
                        None,
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    const WORLD: &str = "name: t
policy:
  products:
    - { code: 1, name: p, container: soft, quantity: 1, counting: user-limit }
hosts:
  - { name: h1, cpu: { vendor: V, model: M } }
  - { name: h2, cpu: { vendor: V, model: M } }
  - { name: ts, role: terminal-server, cpu: { vendor: V, model: M } }
guests:
  - { name: vm1, host: h1 }
steps:
";

    fn first_problem(steps: &str) -> Option<String> {
        let text = format!("{WORLD}{steps}");
        match super::super::parse_str(&text, "t.yaml") {
            Ok(_) => None,
            Err(error) => Some(error.problems()[0].message.clone()),
        }
    }

    #[rstest]
    #[case::snapshot_of_a_stopped_guest_reverts_to_stopped(
        "  - snapshot: { machine: vm1, name: off }\n  - boot: vm1\n  - revert: { machine: vm1, snapshot: off }\n  - access: { machine: vm1, product: 1 }\n",
        Some("machine `vm1` is not running at this step: reverted at line 14")
    )]
    #[case::snapshot_of_a_running_guest_reverts_to_running(
        "  - boot: vm1\n  - snapshot: { machine: vm1, name: on }\n  - shutdown: vm1\n  - revert: { machine: vm1, snapshot: on }\n  - access: { machine: vm1, product: 1 }\n",
        None
    )]
    #[case::a_server_resumes_only_once_paused(
        "  - server-start: { machine: h1 }\n  - server-resume: h1\n",
        Some("the server of `h1` is not paused (`server-pause` it first)")
    )]
    #[case::a_paused_server_is_not_paused_again(
        "  - server-start: { machine: h1 }\n  - server-pause: h1\n  - server-pause: h1\n",
        Some("the server of `h1` is paused already")
    )]
    #[case::a_crashed_server_runs_again(
        "  - server-start: { machine: h1 }\n  - server-pause: h1\n  - server-crash: h1\n  - server-pause: h1\n",
        None
    )]
    #[case::migration_changes_the_host(
        "  - boot: vm1\n  - migrate: { machine: vm1, host: h2 }\n  - migrate: { machine: vm1, host: h2 }\n",
        Some("`vm1` already runs on `h2`")
    )]
    #[case::closing_a_session_ends_its_apps(
        "  - session-open: { machine: ts, as: s1, user: u }\n  - start-app: { machine: ts, session: s1, product: 1, as: a }\n  - session-close: s1\n  - kill: a\n",
        Some("app `a` is no longer running: session `s1` was closed at line 14")
    )]
    #[case::terminal_servers_hold_many_sessions(
        "  - session-open: { machine: ts, as: s1, user: u }\n  - session-open: { machine: ts, as: s2, user: v }\n",
        None
    )]
    #[case::hosts_are_always_up(
        "  - boot: h1\n",
        Some("`h1` is a host; `boot` applies to guests: vm1")
    )]
    #[case::names_are_never_reused(
        "  - session-open: { machine: ts, as: x, user: u }\n  - access: { machine: ts, product: 1, as: x }\n",
        Some("the name `x` is already used at line 12; give this access its own name")
    )]
    fn tracks_state_through_the_steps(#[case] steps: &str, #[case] expected: Option<&str>) {
        assert_eq!(first_problem(steps).as_deref(), expected);
    }
}
