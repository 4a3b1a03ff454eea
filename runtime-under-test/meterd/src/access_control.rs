//! The administrator's access rules as the runtime keeps them: the document in force (kept in
//! the state as `access-rules`) and the user names of the uids it has met.

use std::collections::{BTreeMap, HashMap};

use meter_core::access_rules::AccessRules;

use crate::store::Change;

/// The metadata key of the rules in force (JSON).
pub const RULES_KEY: &str = "access-rules";

/// The rules in force and a cache of user names by uid.
#[derive(Debug, Default)]
pub struct AccessControl {
    rules: Option<AccessRules>,
    names: HashMap<u32, Option<String>>,
}

impl AccessControl {
    /// The rules the store holds, if any (unreadable ones are logged and left out).
    pub fn load(meta: &BTreeMap<String, Vec<u8>>) -> Self {
        let rules = meta.get(RULES_KEY).and_then(|bytes| {
            match serde_json::from_slice::<AccessRules>(bytes) {
                Ok(rules) => Some(rules),
                Err(e) => {
                    tracing::error!(error = %e, "Unreadable access rules in the state");
                    None
                }
            }
        });
        AccessControl {
            rules,
            names: HashMap::new(),
        }
    }

    /// The rules in force.
    pub fn rules(&self) -> Option<&AccessRules> {
        self.rules.as_ref()
    }

    /// Puts `rules` in force (an empty document lifts every rule); the change to store.
    pub fn apply(&mut self, rules: AccessRules) -> Change {
        if rules == AccessRules::default() {
            self.rules = None;
            Change::DeleteMeta(RULES_KEY.into())
        } else {
            let bytes = serde_json::to_vec(&rules).expect("rules always encode");
            self.rules = Some(rules);
            Change::PutMeta(RULES_KEY.into(), bytes)
        }
    }

    /// The user name of `uid`, looked up once with `look_up`.
    pub fn user_name(
        &mut self,
        uid: u32,
        look_up: impl FnOnce(u32) -> Option<String>,
    ) -> Option<String> {
        self.names
            .entry(uid)
            .or_insert_with(|| look_up(uid))
            .clone()
    }
}
