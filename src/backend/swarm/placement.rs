//! What a sandbox asks of the node that runs it, and which nodes give it. Pure, so every
//! refusal is tested here.
//!
//! At API 1.41 a service cannot carry no-new-privileges or a runtime choice: only a node's
//! `daemon.json` (`"no-new-privileges": true`, `"default-runtime"`) can. The operator says
//! which nodes do with node labels; sandboxd places with constraints on those labels. A
//! runtime label is checked against the node's own `docker info` where `swarm.nodes` reaches
//! it (a label its engine contradicts excludes the node); no-new-privileges cannot be checked
//! that way (`docker info` does not show it, measured on 20.10), so its label is the
//! operator's word. A profile no schedulable node satisfies is refused with the missing
//! protection named: never started weaker.
//!
//! Egress rules are host firewall rules, which sandboxd keeps only on its own host. Swarm
//! mode offers one thing instead: `egress: deny` with no exceptions runs on an `internal`
//! overlay network (no route out). Anything else with rules is refused.

use std::collections::BTreeMap;

use crate::domain::spec::ContainerSpec;
use crate::egress::EgressMode;

/// Node label: the node's engine runs every container with no-new-privileges.
pub const LABEL_NO_NEW_PRIVILEGES: &str = "sandboxd.no-new-privileges";
/// Node label: the node's engine's default runtime (e.g. `runsc`).
pub const LABEL_RUNTIME: &str = "sandboxd.runtime";

/// A swarm node as placement sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeFacts {
    pub id: String,
    pub hostname: String,
    /// Status `ready` and availability `active`: it can take a new task.
    pub schedulable: bool,
    pub labels: BTreeMap<String, String>,
    /// Read from the node's own engine, when `swarm.nodes` has it and it answered.
    pub engine: Option<EngineFacts>,
}

/// What a node's `docker info` says it enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineFacts {
    pub default_runtime: String,
}

/// What the spec asks of its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needs {
    pub no_new_privileges: bool,
    /// A runtime other than the baseline `runc`, which every node has.
    pub runtime: Option<String>,
}

impl Needs {
    pub fn of(spec: &ContainerSpec) -> Self {
        Self {
            no_new_privileges: spec.hardening.no_new_privileges,
            runtime: spec.runtime().filter(|r| *r != "runc").map(str::to_string),
        }
    }
}

/// How a service is placed: its constraints, and nodes left out because their engine
/// contradicts their labels (worth a warning).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placement {
    pub constraints: Vec<String>,
    pub contradicted: Vec<String>,
}

/// The network a sandbox joins in swarm mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkKind {
    /// An attachable overlay.
    Open,
    /// An attachable, `internal` overlay: no route out of the overlay (`egress: deny`).
    Internal,
}

/// Why a sandbox is not placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused: {0}")]
pub struct Refusal(pub String);

/// The constraints that put `needs` only on nodes that give it, or the refusal naming what
/// no schedulable node gives.
pub fn place(needs: &Needs, nodes: &[NodeFacts]) -> Result<Placement, Refusal> {
    let mut placement = Placement::default();
    let mut missing = Vec::new();
    let nnp_label =
        |n: &NodeFacts| n.labels.get(LABEL_NO_NEW_PRIVILEGES).map(String::as_str) == Some("true");
    let runtime_label =
        |n: &NodeFacts, r: &str| n.labels.get(LABEL_RUNTIME).map(String::as_str) == Some(r);
    let runtime_engine =
        |n: &NodeFacts, r: &str| n.engine.as_ref().is_none_or(|e| e.default_runtime == r);

    let gives = |n: &NodeFacts| {
        (!needs.no_new_privileges || nnp_label(n))
            && needs
                .runtime
                .as_deref()
                .is_none_or(|r| runtime_label(n, r) && runtime_engine(n, r))
    };
    if needs.no_new_privileges {
        placement
            .constraints
            .push(format!("node.labels.{LABEL_NO_NEW_PRIVILEGES}==true"));
        if !nodes.iter().any(|n| n.schedulable && nnp_label(n)) {
            missing.push(format!(
                "no-new-privileges (no schedulable node is labelled \
                 {LABEL_NO_NEW_PRIVILEGES}=true, the operator's word that its daemon.json sets \
                 \"no-new-privileges\": true; a service cannot carry it at API 1.41)"
            ));
        }
    }
    if let Some(r) = &needs.runtime {
        placement
            .constraints
            .push(format!("node.labels.{LABEL_RUNTIME}=={r}"));
        if !nodes
            .iter()
            .any(|n| n.schedulable && runtime_label(n, r) && runtime_engine(n, r))
        {
            missing.push(format!(
                "runtime {r} (no schedulable node is labelled {LABEL_RUNTIME}={r} with {r} as \
                 its engine's default runtime; a service cannot choose one at API 1.41)"
            ));
        }
    }
    if !missing.is_empty() {
        return Err(Refusal(missing.join("; ")));
    }
    if nodes.iter().filter(|n| n.schedulable).all(|n| !gives(n)) {
        return Err(Refusal(
            "no single schedulable node gives every protection the profile asks for".into(),
        ));
    }
    // A node whose label says more than its engine does is kept out by its id.
    for n in nodes {
        let says_more = needs
            .runtime
            .as_deref()
            .is_some_and(|r| runtime_label(n, r) && !runtime_engine(n, r));
        if says_more {
            placement.constraints.push(format!("node.id!={}", n.id));
            placement.contradicted.push(n.hostname.clone());
        }
    }
    Ok(placement)
}

/// The network kind a spec's egress policy maps to, or the refusal.
pub fn network_kind(spec: &ContainerSpec) -> Result<NetworkKind, Refusal> {
    let Some(profile) = &spec.profile else {
        return Ok(NetworkKind::Open);
    };
    let e = &profile.egress;
    match e.egress {
        EgressMode::Allow if e.deny_cidrs.is_empty() => Ok(NetworkKind::Open),
        EgressMode::Deny if e.allow_cidrs.is_empty() => Ok(NetworkKind::Internal),
        _ => Err(Refusal(format!(
            "profile {}: egress rules (deny_cidrs {:?}, allow_cidrs {:?}) are host firewall \
             rules, which sandboxd keeps only on its own host; in swarm mode use `egress: deny` \
             with no allow_cidrs (an internal overlay), or `egress: allow` with `deny_cidrs: []`",
            profile.name, e.deny_cidrs, e.allow_cidrs
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, labels: &[(&str, &str)], engine: Option<&str>) -> NodeFacts {
        NodeFacts {
            id: id.into(),
            hostname: format!("host-{id}"),
            schedulable: true,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            engine: engine.map(|rt| EngineFacts {
                default_runtime: rt.into(),
            }),
        }
    }

    const NNP: (&str, &str) = (LABEL_NO_NEW_PRIVILEGES, "true");

    fn needs(nnp: bool, runtime: Option<&str>) -> Needs {
        Needs {
            no_new_privileges: nnp,
            runtime: runtime.map(String::from),
        }
    }

    #[test]
    fn nothing_asked_places_anywhere() {
        let p = place(&needs(false, None), &[node("a", &[], None)]).expect("placed");
        assert!(p.constraints.is_empty());
    }

    #[test]
    fn no_new_privileges_goes_to_labelled_nodes() {
        let nodes = [node("a", &[NNP], Some("runc")), node("b", &[], None)];
        let p = place(&needs(true, None), &nodes).expect("placed");
        assert_eq!(
            p.constraints,
            vec!["node.labels.sandboxd.no-new-privileges==true"]
        );
    }

    #[test]
    fn no_labelled_node_is_a_refusal_naming_the_protection() {
        let e = place(&needs(true, None), &[node("a", &[], Some("runc"))]).expect_err("refused");
        assert!(e.0.contains("no-new-privileges"), "{e}");
    }

    #[test]
    fn a_label_the_engine_contradicts_excludes_that_node() {
        let gvisor = (LABEL_RUNTIME, "runsc");
        let nodes = [
            node("a", &[gvisor], Some("runc")),
            node("b", &[gvisor], None),
        ];
        let p = place(&needs(false, Some("runsc")), &nodes).expect("placed on b");
        assert!(p.constraints.contains(&"node.id!=a".to_string()));
        assert_eq!(p.contradicted, vec!["host-a"]);
        // With only the contradicted node, nothing is left.
        assert!(place(&needs(false, Some("runsc")), &nodes[..1]).is_err());
    }

    #[test]
    fn a_runtime_needs_a_node_whose_default_it_is() {
        let gvisor = (LABEL_RUNTIME, "runsc");
        let e =
            place(&needs(false, Some("runsc")), &[node("a", &[NNP], None)]).expect_err("refused");
        assert!(e.0.contains("runtime runsc"), "{e}");
        let p = place(
            &needs(false, Some("runsc")),
            &[node("a", &[gvisor], Some("runsc"))],
        )
        .expect("placed");
        assert_eq!(p.constraints, vec!["node.labels.sandboxd.runtime==runsc"]);
        // Labelled, but the engine's default is runc: refused.
        assert!(place(
            &needs(false, Some("runsc")),
            &[node("a", &[gvisor], Some("runc"))]
        )
        .is_err());
    }

    #[test]
    fn both_must_hold_on_one_node() {
        let nodes = [
            node("a", &[NNP], None),
            node("b", &[(LABEL_RUNTIME, "runsc")], None),
        ];
        let e = place(&needs(true, Some("runsc")), &nodes).expect_err("refused");
        assert!(e.0.contains("single"), "{e}");
    }

    #[test]
    fn drained_or_down_nodes_do_not_count() {
        let mut n = node("a", &[NNP], None);
        n.schedulable = false;
        assert!(place(&needs(true, None), &[n]).is_err());
    }

    #[test]
    fn runc_is_the_baseline() {
        let spec = crate::config::spec::tests_support::spec_with_profile(
            "runc",
            crate::egress::EgressMode::Allow,
            &[],
        );
        assert_eq!(Needs::of(&spec).runtime, None);
    }

    #[test]
    fn egress_maps_to_open_internal_or_refusal() {
        use crate::config::spec::tests_support::spec_with_profile;
        use crate::egress::EgressMode::{Allow, Deny};
        assert_eq!(
            network_kind(&spec_with_profile("runc", Allow, &[])),
            Ok(NetworkKind::Open)
        );
        assert_eq!(
            network_kind(&spec_with_profile("runc", Deny, &[])),
            Ok(NetworkKind::Internal)
        );
        let e =
            network_kind(&spec_with_profile("runc", Allow, &["10.0.0.0/8"])).expect_err("refused");
        assert!(e.0.contains("host firewall rules"), "{e}");
    }
}
