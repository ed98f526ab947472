//! What a migration carries of the vIOMMU: the table (endpoints, domains with their
//! mappings, tracking state and the bits the guest has not read yet, the bypass byte)
//! and the fault records not yet delivered. Plain data, versioned.

use serde::{Deserialize, Serialize};

use super::dirty::{DirtyPages, DirtyPagesState};
use super::domain::{IovaDomain, Mapping};
use super::requests::{ReservedIova, MAX_MAPPINGS};
use super::table::{Domain, Endpoint, FaultRecord, IommuTable, MAX_PENDING_FAULTS};
use super::DOMAIN_RANGE;

pub const VIOMMU_STATE_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointState {
    pub id: u32,
    pub domain: Option<u32>,
    pub trackable: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainState {
    pub id: u32,
    pub bypass: bool,
    pub mappings: Vec<Mapping>,
    /// Present while the guest tracks the domain: the bits it has not read.
    pub dirty: Option<DirtyPagesState>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViommuState {
    pub version: u32,
    pub bypass: bool,
    pub endpoints: Vec<EndpointState>,
    pub domains: Vec<DomainState>,
    pub pending_faults: Vec<FaultRecord>,
}

impl IommuTable {
    /// The state now (devices paused: nothing translates meanwhile).
    pub fn state(&self) -> ViommuState {
        let t = self.read();
        ViommuState {
            version: VIOMMU_STATE_VERSION,
            bypass: t.bypass,
            endpoints: t
                .endpoints
                .iter()
                .map(|(id, e)| EndpointState {
                    id: *id,
                    domain: e.domain,
                    trackable: e.trackable,
                })
                .collect(),
            domains: t
                .domains
                .iter()
                .map(|(id, d)| DomainState {
                    id: *id,
                    bypass: d.bypass,
                    mappings: d.mappings.mappings().copied().collect(),
                    dirty: d.dirty.as_ref().map(DirtyPages::state),
                })
                .collect(),
            pending_faults: self.pending_faults(),
        }
    }

    /// Takes `state` from a source. The endpoints must be this VM's (the same devices
    /// behind the vIOMMU); every mapping is checked again as a MAP would be. On an error
    /// nothing changed.
    pub fn restore(&self, state: &ViommuState) -> Result<(), String> {
        if state.version != VIOMMU_STATE_VERSION {
            return Err(format!(
                "vIOMMU state version {} (this Ferry reads {VIOMMU_STATE_VERSION})",
                state.version
            ));
        }
        let mut t = self.write();
        let mine: Vec<u32> = t.endpoints.keys().copied().collect();
        let theirs: Vec<u32> = state.endpoints.iter().map(|e| e.id).collect();
        if mine != theirs {
            return Err(format!(
                "vIOMMU endpoints differ: source {theirs:x?}, here {mine:x?}"
            ));
        }
        if state.pending_faults.len() > MAX_PENDING_FAULTS {
            return Err(format!(
                "{} pending faults (at most {MAX_PENDING_FAULTS} are kept)",
                state.pending_faults.len()
            ));
        }
        let mut domains = std::collections::BTreeMap::new();
        for d in &state.domains {
            // What ATTACH and MAP would have refused cannot come in by migration either.
            if !DOMAIN_RANGE.contains(&d.id) {
                return Err(format!(
                    "domain {} is outside the domain range {DOMAIN_RANGE:?}",
                    d.id
                ));
            }
            if domains.contains_key(&d.id) {
                return Err(format!("domain {} appears twice", d.id));
            }
            if d.bypass && !d.mappings.is_empty() {
                return Err(format!(
                    "domain {} is a bypass domain with {} mapping(s)",
                    d.id,
                    d.mappings.len()
                ));
            }
            if d.mappings.len() > MAX_MAPPINGS {
                return Err(format!(
                    "domain {} has {} mappings (at most {MAX_MAPPINGS})",
                    d.id,
                    d.mappings.len()
                ));
            }
            let mut mappings = IovaDomain::default();
            for m in &d.mappings {
                if let Some(r) = ReservedIova::of(m.virt_start, m.virt_end) {
                    return Err(format!("domain {} mapping {m:x?} {r}", d.id));
                }
                mappings
                    .map(m.virt_start, m.virt_end, m.phys_start, m.flags, true)
                    .map_err(|e| format!("domain {} mapping {m:x?}: {e}", d.id))?;
            }
            let dirty = match &d.dirty {
                Some(s) => {
                    Some(DirtyPages::from_state(s).map_err(|e| format!("domain {}: {e}", d.id))?)
                }
                None => None,
            };
            domains.insert(
                d.id,
                Domain {
                    mappings,
                    bypass: d.bypass,
                    endpoints: Default::default(),
                    dirty,
                },
            );
        }
        // Domains live while they hold an endpoint; tracking ones only trackable ones.
        let mut endpoints = std::collections::BTreeMap::new();
        for e in &state.endpoints {
            if let Some(id) = e.domain {
                domains
                    .get_mut(&id)
                    .ok_or_else(|| {
                        format!(
                            "endpoint {:#x} in domain {id}, which is not in the state",
                            e.id
                        )
                    })?
                    .endpoints
                    .insert(e.id);
            }
            let trackable = t.endpoints.get(&e.id).is_some_and(|x| x.trackable);
            endpoints.insert(
                e.id,
                Endpoint {
                    domain: e.domain,
                    trackable,
                },
            );
        }
        for (id, d) in &domains {
            if d.endpoints.is_empty() {
                return Err(format!("domain {id} has no endpoint"));
            }
            if d.dirty.is_some() {
                if let Some(e) = d
                    .endpoints
                    .iter()
                    .find(|e| endpoints.get(*e).is_some_and(|e: &Endpoint| !e.trackable))
                {
                    return Err(format!(
                        "domain {id} tracks dirty pages but endpoint {e:#x} cannot report its writes here"
                    ));
                }
            }
        }
        t.bypass = state.bypass;
        t.endpoints = endpoints;
        t.domains = domains;
        drop(t);
        self.set_pending_faults(state.pending_faults.clone());
        Ok(())
    }
}
