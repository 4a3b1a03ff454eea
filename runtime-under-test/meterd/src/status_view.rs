//! The typed views `meter status --json` prints (runtime contract: "Commands for admins").

use meter_core::allocation::{ItemState, ItemView, Usage};
use meter_core::policy::Counting;
use serde::Serialize;

/// One product of a container, as `meter status` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProductStatus {
    /// Product code.
    pub code: u32,
    /// Vendor (firm) code.
    pub firm: u32,
    /// Product name.
    pub name: String,
    /// Licence quantity (0 = local).
    pub quantity: u32,
    /// How use is counted.
    pub counting: Counting,
    /// The item's state.
    pub state: ItemState,
    /// Stations and accesses holding it now.
    pub in_use: Usage,
    /// Pay-per-use units left (`null` = not metered).
    pub units_left: Option<u64>,
    /// Expiry, epoch milliseconds (`null` = never).
    pub expires_at: Option<u64>,
}

impl From<&ItemView> for ProductStatus {
    fn from(view: &ItemView) -> Self {
        Self {
            code: view.entry.product.code,
            firm: view.entry.product.firm,
            name: view.entry.name.clone(),
            quantity: view.entry.rules.quantity,
            counting: view.entry.rules.counting,
            state: view.entry.state,
            in_use: view.in_use,
            units_left: view.entry.units_left,
            expires_at: view.entry.rules.expires_at,
        }
    }
}

impl ProductStatus {
    /// As a JSON value, for the status document.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}
