//! The dongle's persistent flash: identity, programmed items, policy, clock, binding, lockout.

use std::collections::BTreeMap;
use std::fmt;

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use crate::certificate::DeviceCertificate;
pub use crate::serial::Serial;

/// Version of the flash layout written by this crate.
pub const FLASH_FORMAT: u32 = 1;

/// Most product items one dongle holds (keeps every reply inside one frame).
pub const MAX_ITEMS: usize = 32;

/// Longest product item name, in bytes.
pub const MAX_ITEM_NAME: usize = 64;

/// Longest runtime id, in bytes.
pub const MAX_RUNTIME_ID: usize = 64;

/// Identity of a runtime (one `meterd`) talking to the dongle.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RuntimeId(String);

/// A runtime id that is empty, too long or not printable ASCII.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Invalid runtime id {0:?}: 1 to 64 printable ASCII characters")]
pub struct InvalidRuntimeId(pub String);

impl RuntimeId {
    /// Checks and wraps a runtime id (1 to 64 printable ASCII characters).
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidRuntimeId> {
        let id = id.into();
        let printable = id.bytes().all(|byte| byte.is_ascii_graphic());
        if id.is_empty() || id.len() > MAX_RUNTIME_ID || !printable {
            return Err(InvalidRuntimeId(id));
        }
        Ok(Self(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RuntimeId {
    type Error = InvalidRuntimeId;

    fn try_from(id: String) -> Result<Self, Self::Error> {
        Self::new(id)
    }
}

impl From<RuntimeId> for String {
    fn from(id: RuntimeId) -> Self {
        id.0
    }
}

impl fmt::Display for RuntimeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How accesses to a dongle item count against its quantity (enforced by the runtime).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ItemCounting {
    /// Each access takes one.
    UserLimit,
    /// Each station takes one, however many accesses it makes.
    #[default]
    StationShare,
    /// Accesses are not counted.
    NoCount,
}

/// A product item programmed into the dongle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ProductItem {
    /// Vendor (firm) code.
    pub firm: u32,
    /// Product code.
    pub code: u32,
    /// Product name.
    pub name: String,
    /// Licence quantity; 0 means a local single-user licence.
    pub quantity: u32,
    /// How accesses are counted against the quantity.
    #[serde(default)]
    pub counting: ItemCounting,
    /// Expiry, in dongle clock milliseconds (unix time).
    #[serde(default)]
    pub expires_at: Option<u64>,
    /// Pay-per-use units left; `None` for an unmetered item.
    #[serde(default)]
    pub units: Option<u64>,
    /// The vendor's switch: the item is refused in virtual machines.
    #[serde(default)]
    pub deny_virtual_machines: bool,
    /// The vendor's switch: the item is refused in terminal-server sessions.
    #[serde(default)]
    pub deny_terminal_server: bool,
}

impl ProductItem {
    /// True once the dongle clock has reached the expiry time.
    pub fn is_expired(&self, clock_ms: u64) -> bool {
        self.expires_at.is_some_and(|expiry| clock_ms >= expiry)
    }
}

/// Rebind and lockout policy programmed by the vendor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DonglePolicy {
    /// Rebinds allowed within `rebind_window_ms`; one more locks the dongle out.
    pub max_rebinds: u32,
    /// Sliding window for counting rebinds, oscillator milliseconds.
    pub rebind_window_ms: u64,
    /// How long a lockout lasts, oscillator milliseconds.
    pub lockout_ms: u64,
    /// A bound session whose last frame is younger than this is active: a bind from another
    /// runtime meanwhile is shared use.
    pub active_window_ms: u64,
}

impl Default for DonglePolicy {
    fn default() -> Self {
        Self {
            max_rebinds: 3,
            rebind_window_ms: 60_000,
            lockout_ms: 300_000,
            active_window_ms: 10_000,
        }
    }
}

/// The dongle's clock: a battery-backed oscillator plus a forward-only offset set by hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DongleClock {
    /// Highest oscillator reading seen, milliseconds; never decreases.
    pub oscillator_ms: u64,
    /// Added to the oscillator to give the clock; only grows.
    pub offset_ms: u64,
}

impl DongleClock {
    /// The dongle's time, unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.oscillator_ms.saturating_add(self.offset_ms)
    }

    /// Moves the oscillator to `now_ms` if that is later; returns whether it moved.
    pub(crate) fn observe(&mut self, now_ms: u64) -> bool {
        if now_ms > self.oscillator_ms {
            self.oscillator_ms = now_ms;
            true
        } else {
            false
        }
    }

    /// Moves the clock to `unix_ms`; refuses to go backwards and returns the current time then.
    pub(crate) fn set(&mut self, unix_ms: u64) -> Result<(), u64> {
        let now = self.now_ms();
        if unix_ms < now {
            return Err(now);
        }
        self.offset_ms = self.offset_ms.saturating_add(unix_ms - now);
        Ok(())
    }
}

/// Which runtime the dongle is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Binding {
    /// The bound runtime.
    pub runtime: RuntimeId,
    /// The key the bound runtime proved at its hello (zeros in flash written before hellos
    /// carried keys).
    #[serde(default, with = "crate::byte_array")]
    pub runtime_key: [u8; 32],
    /// The session that holds the binding.
    pub session: u32,
    /// Oscillator time of the bind.
    pub bound_at_ms: u64,
}

impl Binding {
    /// Whether a hello from `runtime` proving `key` comes from the bound runtime: the same id
    /// with another key is another runtime.
    pub fn is_runtime(&self, runtime: &RuntimeId, key: &[u8; 32]) -> bool {
        self.runtime == *runtime && self.runtime_key == *key
    }
}

/// Why the dongle is locked out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LockoutReason {
    /// A second runtime bound while the first was still active.
    Shared,
    /// Too many rebinds within the window.
    TooManyRebinds,
}

impl LockoutReason {
    /// The runtime contract's reason code (`dongle-shared`, `dongle-locked-out`).
    pub fn reason_code(self) -> &'static str {
        match self {
            Self::Shared => "dongle-shared",
            Self::TooManyRebinds => "dongle-locked-out",
        }
    }
}

/// A lockout in force until an oscillator time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Lockout {
    /// Why.
    pub reason: LockoutReason,
    /// Oscillator time at which it was set (0 in flash written before it was recorded).
    #[serde(default)]
    pub since_ms: u64,
    /// Oscillator time at which the dongle is usable again.
    pub until_ms: u64,
}

/// A runtime's receipt-chain head kept by the dongle as a rollback witness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct WitnessHead {
    /// Number of receipts in the chain.
    pub sequence: u64,
    /// Hash of the newest receipt.
    #[serde(with = "crate::byte_array")]
    pub head: [u8; 32],
}

/// A programming request the dongle refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgramError {
    /// The key is not the vendor key that certified this dongle.
    #[error("Not the vendor that certified dongle {0}")]
    WrongVendor(Serial),
    /// The item is not valid.
    #[error("Invalid item: {0}")]
    InvalidItem(&'static str),
    /// The dongle already holds [`MAX_ITEMS`] items.
    #[error("Dongle full: at most {MAX_ITEMS} items")]
    Full,
    /// No such item.
    #[error("No item {firm}:{code}")]
    UnknownItem {
        /// Firm code.
        firm: u32,
        /// Product code.
        code: u32,
    },
    /// The policy is not valid.
    #[error("Invalid policy: {0}")]
    InvalidPolicy(&'static str),
}

/// The dongle's persistent memory; serialisable so an emulator can keep it in a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Flash {
    pub(crate) format: u32,
    pub(crate) serial: Serial,
    #[serde(with = "crate::byte_array")]
    pub(crate) device_secret: [u8; 32],
    pub(crate) certificate: DeviceCertificate,
    #[serde(with = "crate::byte_array")]
    pub(crate) entropy_pool: [u8; 32],
    pub(crate) items: Vec<ProductItem>,
    pub(crate) policy: DonglePolicy,
    pub(crate) clock: DongleClock,
    pub(crate) binding: Option<Binding>,
    pub(crate) session_counter: u64,
    pub(crate) rebinds: Vec<u64>,
    pub(crate) lockout: Option<Lockout>,
    pub(crate) witnesses: BTreeMap<RuntimeId, WitnessHead>,
}

impl Flash {
    /// A new dongle: device key from `device_seed`, certified by `vendor`; default policy, no items.
    pub fn manufacture(
        serial: Serial,
        device_seed: [u8; 32],
        entropy_seed: [u8; 32],
        vendor: &SigningKey,
    ) -> Flash {
        let device = SigningKey::from_bytes(&device_seed);
        let certificate = DeviceCertificate::issue(serial, &device.verifying_key(), vendor);
        Flash {
            format: FLASH_FORMAT,
            serial,
            device_secret: device_seed,
            certificate,
            entropy_pool: entropy_seed,
            items: Vec::new(),
            policy: DonglePolicy::default(),
            clock: DongleClock::default(),
            binding: None,
            session_counter: 0,
            rebinds: Vec::new(),
            lockout: None,
            witnesses: BTreeMap::new(),
        }
    }

    /// Adds an item, or replaces the item with the same firm and product code.
    pub fn program_item(
        &mut self,
        vendor: &SigningKey,
        item: ProductItem,
    ) -> Result<(), ProgramError> {
        self.check_vendor(vendor)?;
        if item.name.is_empty() || item.name.len() > MAX_ITEM_NAME {
            return Err(ProgramError::InvalidItem("name must be 1 to 64 bytes"));
        }
        let full = self.items.len() >= MAX_ITEMS;
        match self.item_mut(item.firm, item.code) {
            Some(held) => *held = item,
            None if full => return Err(ProgramError::Full),
            None => self.items.push(item),
        }
        Ok(())
    }

    /// Removes an item and returns it.
    pub fn remove_item(
        &mut self,
        vendor: &SigningKey,
        firm: u32,
        code: u32,
    ) -> Result<ProductItem, ProgramError> {
        self.check_vendor(vendor)?;
        let index = self
            .items
            .iter()
            .position(|held| held.firm == firm && held.code == code)
            .ok_or(ProgramError::UnknownItem { firm, code })?;
        Ok(self.items.remove(index))
    }

    /// Sets the rebind and lockout policy.
    pub fn set_policy(
        &mut self,
        vendor: &SigningKey,
        policy: DonglePolicy,
    ) -> Result<(), ProgramError> {
        self.check_vendor(vendor)?;
        if policy.rebind_window_ms == 0 {
            return Err(ProgramError::InvalidPolicy(
                "rebind window must be positive",
            ));
        }
        if policy.active_window_ms == 0 {
            return Err(ProgramError::InvalidPolicy(
                "active window must be positive",
            ));
        }
        self.policy = policy;
        Ok(())
    }

    /// Lifts a lockout and forgets the rebind history (vendor service operation).
    pub fn clear_lockout(&mut self, vendor: &SigningKey) -> Result<(), ProgramError> {
        self.check_vendor(vendor)?;
        self.lockout = None;
        self.rebinds.clear();
        Ok(())
    }

    fn check_vendor(&self, vendor: &SigningKey) -> Result<(), ProgramError> {
        if vendor.verifying_key().to_bytes() != self.certificate.vendor_key {
            return Err(ProgramError::WrongVendor(self.serial));
        }
        Ok(())
    }

    /// The serial number.
    pub fn serial(&self) -> Serial {
        self.serial
    }

    /// The vendor certificate of the device key.
    pub fn certificate(&self) -> &DeviceCertificate {
        &self.certificate
    }

    /// The programmed items.
    pub fn items(&self) -> &[ProductItem] {
        &self.items
    }

    /// One item by firm and product code.
    pub fn item(&self, firm: u32, code: u32) -> Option<&ProductItem> {
        self.items
            .iter()
            .find(|item| item.firm == firm && item.code == code)
    }

    /// The rebind and lockout policy.
    pub fn policy(&self) -> DonglePolicy {
        self.policy
    }

    /// The dongle clock.
    pub fn clock(&self) -> DongleClock {
        self.clock
    }

    /// The current binding, if any.
    pub fn binding(&self) -> Option<&Binding> {
        self.binding.as_ref()
    }

    /// The lockout recorded in flash (it may have run out; see [`Flash::lockout_at`]).
    pub fn lockout(&self) -> Option<Lockout> {
        self.lockout
    }

    /// The lockout in force at oscillator time `now_ms`.
    pub fn lockout_at(&self, now_ms: u64) -> Option<Lockout> {
        self.lockout
            .filter(|lockout| now_ms.max(self.clock.oscillator_ms) < lockout.until_ms)
    }

    /// Oscillator times of the rebinds still remembered.
    pub fn rebind_history(&self) -> &[u64] {
        &self.rebinds
    }

    /// Sessions opened since manufacture.
    pub fn session_counter(&self) -> u64 {
        self.session_counter
    }

    /// The receipt-chain head stored for a runtime.
    pub fn witness(&self, runtime: &RuntimeId) -> Option<WitnessHead> {
        self.witnesses.get(runtime).copied()
    }

    pub(crate) fn device_key(&self) -> SigningKey {
        SigningKey::from_bytes(&self.device_secret)
    }

    pub(crate) fn item_mut(&mut self, firm: u32, code: u32) -> Option<&mut ProductItem> {
        self.items
            .iter_mut()
            .find(|item| item.firm == firm && item.code == code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn vendor() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    fn item(code: u32) -> ProductItem {
        ProductItem {
            firm: 10,
            code,
            name: format!("product-{code}"),
            quantity: 1,
            counting: ItemCounting::UserLimit,
            expires_at: None,
            units: Some(5),
            deny_virtual_machines: false,
            deny_terminal_server: false,
        }
    }

    #[rstest]
    #[case("vm1", true)]
    #[case("host-a/meterd#3", true)]
    #[case("", false)]
    #[case("has space", false)]
    #[case("é", false)]
    fn runtime_id_rules(#[case] id: &str, #[case] valid: bool) {
        assert_eq!(RuntimeId::new(id).is_ok(), valid);
    }

    #[test]
    fn runtime_id_length_limit() {
        assert!(RuntimeId::new("a".repeat(64)).is_ok());
        assert!(RuntimeId::new("a".repeat(65)).is_err());
    }

    #[test]
    fn programming_needs_the_certifying_vendor() {
        let mut flash = Flash::manufacture(Serial(1), [1; 32], [2; 32], &vendor());
        let other = SigningKey::from_bytes(&[8; 32]);
        assert_eq!(
            flash.program_item(&other, item(1)),
            Err(ProgramError::WrongVendor(Serial(1)))
        );
        assert_eq!(
            flash.set_policy(&other, DonglePolicy::default()),
            Err(ProgramError::WrongVendor(Serial(1)))
        );
        flash.program_item(&vendor(), item(1)).unwrap();
        assert_eq!(flash.items().len(), 1);
    }

    #[test]
    fn programming_replaces_same_code_and_limits_count() {
        let mut flash = Flash::manufacture(Serial(1), [1; 32], [2; 32], &vendor());
        flash.program_item(&vendor(), item(1)).unwrap();
        let mut changed = item(1);
        changed.units = Some(99);
        flash.program_item(&vendor(), changed).unwrap();
        assert_eq!(flash.items().len(), 1);
        assert_eq!(flash.item(10, 1).unwrap().units, Some(99));
        for code in 2..=MAX_ITEMS as u32 {
            flash.program_item(&vendor(), item(code)).unwrap();
        }
        assert_eq!(
            flash.program_item(&vendor(), item(1000)),
            Err(ProgramError::Full)
        );
        assert_eq!(flash.remove_item(&vendor(), 10, 1).unwrap().code, 1);
        assert_eq!(
            flash.remove_item(&vendor(), 10, 1),
            Err(ProgramError::UnknownItem { firm: 10, code: 1 })
        );
    }

    #[test]
    fn invalid_policy_refused() {
        let mut flash = Flash::manufacture(Serial(1), [1; 32], [2; 32], &vendor());
        let policy = DonglePolicy {
            rebind_window_ms: 0,
            ..DonglePolicy::default()
        };
        assert!(matches!(
            flash.set_policy(&vendor(), policy),
            Err(ProgramError::InvalidPolicy(_))
        ));
    }

    #[rstest]
    #[case(1_000, 500, Err(1_000))]
    #[case(1_000, 1_000, Ok(()))]
    #[case(1_000, 5_000, Ok(()))]
    fn clock_only_moves_forward(
        #[case] start: u64,
        #[case] target: u64,
        #[case] expected: Result<(), u64>,
    ) {
        let mut clock = DongleClock::default();
        clock.observe(start);
        assert_eq!(clock.set(target), expected);
        assert_eq!(clock.now_ms(), start.max(target));
        assert!(!clock.observe(start - 1));
        assert_eq!(clock.now_ms(), start.max(target));
    }

    #[test]
    fn flash_round_trips_through_json_and_postcard() {
        let mut flash = Flash::manufacture(Serial(42), [1; 32], [2; 32], &vendor());
        flash.program_item(&vendor(), item(1)).unwrap();
        flash.witnesses.insert(
            RuntimeId::new("vm1").unwrap(),
            WitnessHead {
                sequence: 3,
                head: [9; 32],
            },
        );
        let json = serde_json::to_string(&flash).unwrap();
        assert!(json.contains(&hex::encode([9u8; 32])));
        assert_eq!(serde_json::from_str::<Flash>(&json).unwrap(), flash);
        let bytes = postcard::to_allocvec(&flash).unwrap();
        assert_eq!(postcard::from_bytes::<Flash>(&bytes).unwrap(), flash);
    }
}
