//! The administrator's access rules as the runtime keeps them: the document in force (kept in
//! the state as `access-rules`) and the user names of the uids it has met.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use meter_core::access_rules::AccessRules;

use crate::store::Change;

/// The metadata key of the rules in force (JSON).
pub const RULES_KEY: &str = "access-rules";

/// The rules in force and a cache of user names by uid.
#[derive(Debug, Default)]
pub struct AccessControl {
    rules: Option<Arc<AccessRules>>,
    names: HashMap<u32, String>,
}

impl AccessControl {
    /// The rules the store holds, if any. Unreadable ones fail closed: every access is refused
    /// until an administrator applies rules again.
    pub fn load(meta: &BTreeMap<String, Vec<u8>>) -> Self {
        let rules = meta.get(RULES_KEY).map(|bytes| {
            Arc::new(serde_json::from_slice::<AccessRules>(bytes).unwrap_or_else(|e| {
                tracing::error!(error = %e, "Unreadable access rules in the state: refusing every access");
                AccessRules {
                    default: meter_core::access_rules::Action::Deny,
                    ..AccessRules::default()
                }
            }))
        });
        AccessControl {
            rules,
            names: HashMap::new(),
        }
    }

    /// The rules in force (a shared handle: asking them copies nothing).
    pub fn rules(&self) -> Option<Arc<AccessRules>> {
        self.rules.clone()
    }

    /// The change that stores `rules` (an empty document lifts every rule).
    pub fn change_for(rules: &AccessRules) -> Change {
        if *rules == AccessRules::default() {
            Change::DeleteMeta(RULES_KEY.into())
        } else {
            let bytes = serde_json::to_vec(rules).expect("rules always encode");
            Change::PutMeta(RULES_KEY.into(), bytes)
        }
    }

    /// Puts `rules` in force (once stored).
    pub fn set(&mut self, rules: AccessRules) {
        self.rules = (rules != AccessRules::default()).then(|| Arc::new(rules));
    }

    /// The user name of `uid`: a name found once is kept; no name (or a failed look-up) is
    /// asked again next time.
    pub fn user_name(
        &mut self,
        uid: u32,
        look_up: impl FnOnce(u32) -> Option<String>,
    ) -> Option<String> {
        if let Some(name) = self.names.get(&uid) {
            return Some(name.clone());
        }
        let name = look_up(uid)?;
        self.names.insert(uid, name.clone());
        Some(name)
    }
}
