//! Egress policy as host firewall rules (pure): what the rules of an instance must be, given
//! the live sandboxes' frozen policies, and whether the rules found on the host are those.
//! The adapter (`iptables.rs`) reads and writes them; the controller (`controller/egress.rs`)
//! decides when.
//!
//! Layout, per instance (chain names carry a hash of `controller.instance`, so instances and
//! test runs on one host never touch each other's rules):
//!
//! ```text
//! DOCKER-USER (FORWARD) ─┐
//! INPUT ─────────────────┴─► SBX-<i>: RELATED,ESTABLISHED → RETURN
//!                                     -i <bridge of network N> → SBX-<i>-<n>
//! SBX-<i>-<n>: allow_cidrs → RETURN; `host` → REJECT (any local address of the host);
//!              deny_cidrs → REJECT; egress deny → REJECT everything else
//! ```
//!
//! Rules are keyed by the sandbox network's bridge, so they exist before a sandbox on it can
//! send its first packet. `INPUT` is needed because a sandbox reaching the host (its
//! gateway, or any host address) is delivered locally and never crosses `FORWARD`. Replies to
//! connections made *to* a sandbox (its endpoint) are established traffic and pass.

pub mod iptables;

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

pub use crate::domain::egress::{check_cidr, EgressMode, EgressPolicy, DEFAULT_DENY, HOST};

/// The rules an instance must have: per bridge, the (merged) policy of its network.
pub type Desired = BTreeMap<String, EgressPolicy>;

/// Merges the live sandboxes' policies per bridge; policies that need no rules are left out.
pub fn desired<'a>(policies: impl IntoIterator<Item = (&'a str, &'a EgressPolicy)>) -> Desired {
    let mut out: Desired = BTreeMap::new();
    for (bridge, policy) in policies {
        if !policy.needs_rules() {
            continue;
        }
        out.entry(bridge.to_string())
            .and_modify(|p| *p = p.strictest(policy))
            .or_insert_with(|| policy.canonical());
    }
    out
}

/// The top chain of an instance: `SBX-` and 8 hex digits.
pub fn top_chain(instance: &str) -> String {
    format!("SBX-{}", short_hash(instance))
}

fn network_chain(instance: &str, bridge: &str) -> String {
    format!("SBX-{}-{}", short_hash(instance), short_hash(bridge))
}

fn short_hash(text: &str) -> String {
    hex::encode(&Sha256::digest(text.as_bytes())[..4])
}

/// Chains and their rules (`-A` lines, without the chain name), as they must be.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ruleset {
    pub chains: BTreeMap<String, Vec<String>>,
}

/// The host's DNS servers (`/etc/resolv.conf`, IPv4, not loopback). Docker's embedded
/// resolver (127.0.0.11 in the sandbox) forwards queries to them *from the sandbox's network
/// namespace*, so they cross these rules and must stay reachable on port 53.
pub fn host_resolvers() -> Vec<std::net::Ipv4Addr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    parse_resolvers(&text)
}

fn parse_resolvers(text: &str) -> Vec<std::net::Ipv4Addr> {
    let mut out: Vec<std::net::Ipv4Addr> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse().ok())
        .filter(|ip: &std::net::Ipv4Addr| !ip.is_loopback())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Renders an instance's rules. Every rule carries a comment with a digest of the whole set,
/// so the host's copy can be compared without parsing how iptables re-spells a rule. `dns`:
/// the host's resolvers, reachable on port 53 whatever the policy (name resolution works;
/// `docs/security.md` says what that leaves open).
pub fn render(instance: &str, desired: &Desired, dns: &[std::net::Ipv4Addr]) -> Ruleset {
    let top = top_chain(instance);
    let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut top_rules = vec!["-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN".to_string()];
    for (bridge, policy) in desired {
        let chain = network_chain(instance, bridge);
        top_rules.push(format!("-i {bridge} -j {chain}"));
        let mut rules = Vec::new();
        for ip in dns {
            rules.push(format!("-d {ip}/32 -p udp -m udp --dport 53 -j RETURN"));
            rules.push(format!("-d {ip}/32 -p tcp -m tcp --dport 53 -j RETURN"));
        }
        for c in &policy.allow_cidrs {
            rules.push(match c.as_str() {
                HOST => "-m addrtype --dst-type LOCAL -j RETURN".to_string(),
                cidr => format!("-d {cidr} -j RETURN"),
            });
        }
        for c in &policy.deny_cidrs {
            rules.push(match c.as_str() {
                HOST => "-m addrtype --dst-type LOCAL -j REJECT".to_string(),
                cidr => format!("-d {cidr} -j REJECT"),
            });
        }
        if policy.egress == EgressMode::Deny {
            rules.push("-j REJECT".to_string());
        }
        chains.insert(chain, rules);
    }
    chains.insert(top, top_rules);
    stamp(&mut chains);
    Ruleset { chains }
}

/// Adds the digest of the whole set to every rule, as a comment.
fn stamp(chains: &mut BTreeMap<String, Vec<String>>) {
    let digest = {
        let mut h = Sha256::new();
        for (name, rules) in chains.iter() {
            h.update(name.as_bytes());
            for r in rules {
                h.update(r.as_bytes());
            }
        }
        hex::encode(&h.finalize()[..6])
    };
    for rules in chains.values_mut() {
        for r in rules.iter_mut() {
            *r = format!("{r} -m comment --comment sbx:{digest}");
        }
    }
}

impl Ruleset {
    /// The `iptables-restore --noflush` input that makes the chains exactly these (declared
    /// chains are created or emptied, then filled) when `rewrite`, and inserts the jumps to
    /// `top` missing from `hooks`: one atomic commit, so there is no gap.
    pub fn restore_input(
        &self,
        rewrite: bool,
        top: &str,
        hooks: &[String],
        moved: &[String],
    ) -> String {
        let mut out = String::from("*filter\n");
        if rewrite {
            for name in self.chains.keys() {
                out.push_str(&format!(":{name} - [0:0]\n"));
            }
            for (name, rules) in &self.chains {
                for r in rules {
                    out.push_str(&format!("-A {name} {r}\n"));
                }
            }
        }
        for hook in moved {
            out.push_str(&format!("-D {hook} -j {top}\n"));
        }
        for hook in hooks.iter().chain(moved) {
            out.push_str(&format!("-I {hook} 1 -j {top}\n"));
        }
        out.push_str("COMMIT\n");
        out
    }

    /// The digest every rule carries.
    fn digest(&self) -> Option<&str> {
        self.chains
            .values()
            .flatten()
            .next()
            .and_then(|r| r.rsplit("sbx:").next())
    }
}

/// An instance's rules as found on the host (`iptables-save -t filter`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Found {
    /// Chain → its rules' comments digests (one per rule, `None` for a rule without ours).
    pub chains: BTreeMap<String, Vec<Option<String>>>,
    /// Hooks that jump to the top chain (`DOCKER-USER`, `INPUT`), and whether the jump is
    /// the hook's first rule (a rule put before it, such as another tool's `ACCEPT`, would
    /// bypass ours).
    pub jumps: BTreeMap<String, bool>,
}

/// Reads an instance's chains out of `iptables-save` text.
pub fn parse_saved(instance: &str, saved: &str) -> Found {
    let hooks = KNOWN_HOOKS;
    let prefix = top_chain(instance);
    let mut found = Found::default();
    let mut in_filter = false;
    let mut seen_in_hook: BTreeMap<&str, usize> = BTreeMap::new();
    for line in saved.lines() {
        if line.starts_with('*') {
            in_filter = line == "*filter";
            continue;
        }
        if !in_filter {
            continue;
        }
        if let Some(name) = line.strip_prefix(':') {
            let name = name.split_whitespace().next().unwrap_or_default();
            if is_ours(name, &prefix) {
                found.chains.entry(name.to_string()).or_default();
            }
            continue;
        }
        let Some(rule) = line.strip_prefix("-A ") else {
            continue;
        };
        let (chain, rest) = rule.split_once(' ').unwrap_or((rule, ""));
        if is_ours(chain, &prefix) {
            let digest = rest.split("sbx:").nth(1).map(|d| {
                d.split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .trim_matches('"')
                    .to_string()
            });
            found
                .chains
                .entry(chain.to_string())
                .or_default()
                .push(digest);
        } else if let Some(hook) = hooks.iter().find(|h| **h == chain) {
            let index = seen_in_hook.entry(hook).or_insert(0);
            if rest.trim() == format!("-j {prefix}") {
                // One jump first in its hook is what counts (a duplicate later is harmless).
                let first = *index == 0;
                let entry = found.jumps.entry(hook.to_string()).or_insert(false);
                *entry = *entry || first;
            }
            // Other instances' jumps ahead of ours only ever reject: they do not count, or
            // two instances would move their jumps in front of each other for ever.
            if !rest.trim().starts_with("-j SBX-") {
                *index += 1;
            }
        }
    }
    found
}

/// Whether, in a listing of `hook` (`iptables -S hook`), the instance's jump comes before any
/// rule but other instances' jumps.
pub fn jump_first_in_listing(instance: &str, hook: &str, listed: &str) -> bool {
    let ours = format!("-j {}", top_chain(instance));
    let rule_of = format!("-A {hook} ");
    listed
        .lines()
        .filter_map(|l| l.strip_prefix(&rule_of).map(str::trim))
        .find(|rest| *rest == ours || !rest.starts_with("-j SBX-"))
        .is_some_and(|rest| rest == ours)
}

fn is_ours(chain: &str, prefix: &str) -> bool {
    chain == prefix
        || chain
            .strip_prefix(prefix)
            .is_some_and(|r| r.starts_with('-'))
}

/// dockerd's chain for user rules in FORWARD, before its own: the IPv4 forward hook on the
/// docker backend. Podman (netavark) accepts in FORWARD above it, so there the hook is
/// FORWARD itself (`backend::HostRules::forward_hook`).
pub const DOCKER_USER: &str = "DOCKER-USER";

/// Every chain sandboxd may have jumped from (read back, and cleared on removal, whatever
/// the backend).
pub const KNOWN_HOOKS: [&str; 3] = [DOCKER_USER, "FORWARD", "INPUT"];

/// IPv4 (`iptables`) or IPv6 (`ip6tables`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// Where the top chain is jumped to from: IPv4's `forward` hook (the backend's) and
    /// INPUT. IPv6 has no `DOCKER-USER` unless Docker manages ip6tables, so FORWARD itself.
    pub fn hooks(self, forward: &'static str) -> [&'static str; 2] {
        match self {
            Family::V4 => [forward, "INPUT"],
            Family::V6 => ["FORWARD", "INPUT"],
        }
    }

    pub fn tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
}

/// The IPv6 rules: sandboxes of a network with rules get no IPv6 at all beyond replies (the
/// policies are IPv4 CIDRs; without these, a sandbox could reach the host's services on `::`
/// through the bridge's link-local address).
pub fn render_v6(instance: &str, desired: &Desired) -> Ruleset {
    let mut top = vec!["-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN".to_string()];
    top.extend(
        desired
            .keys()
            .map(|bridge| format!("-i {bridge} -j REJECT")),
    );
    let mut chains = BTreeMap::from([(top_chain(instance), top)]);
    stamp(&mut chains);
    Ruleset { chains }
}

/// What must change on the host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Changes {
    /// Rewrite every chain of the set (some chain is missing or differs).
    pub rewrite: bool,
    /// Hooks whose jump is missing.
    pub add_jumps: Vec<String>,
    /// Hooks whose jump is there but not first: moved to the front.
    pub move_jumps: Vec<String>,
    /// Chains of ours that are no longer wanted (deleted after the rewrite).
    pub drop_chains: Vec<String>,
    /// Nothing wanted at all: remove the jumps and every chain.
    pub remove_all: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        !self.rewrite
            && self.add_jumps.is_empty()
            && self.move_jumps.is_empty()
            && self.drop_chains.is_empty()
            && !self.remove_all
    }
}

/// Compares the wanted set with what the host has.
pub fn diff(
    wanted: &Ruleset,
    found: &Found,
    nothing_wanted: bool,
    hooks: [&'static str; 2],
) -> Changes {
    if nothing_wanted {
        let remove_all = !found.chains.is_empty() || !found.jumps.is_empty();
        return Changes {
            remove_all,
            ..Default::default()
        };
    }
    let digest = wanted.digest().map(str::to_string);
    let rewrite = wanted.chains.iter().any(|(name, rules)| {
        found.chains.get(name).is_none_or(|have| {
            have.len() != rules.len() || have.iter().any(|d| d.as_ref() != digest.as_ref())
        })
    });
    Changes {
        rewrite,
        add_jumps: hooks
            .iter()
            .filter(|h| !found.jumps.contains_key(**h))
            .map(|h| h.to_string())
            .collect(),
        move_jumps: hooks
            .iter()
            .filter(|h| found.jumps.get(**h) == Some(&false))
            .map(|h| h.to_string())
            .collect(),
        drop_chains: found
            .chains
            .keys()
            .filter(|c| !wanted.chains.contains_key(*c))
            .cloned()
            .collect(),
        remove_all: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_policy() -> EgressPolicy {
        EgressPolicy {
            egress: EgressMode::Allow,
            allow_cidrs: vec![],
            deny_cidrs: DEFAULT_DENY.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn rules_allow_first_then_deny_then_the_default() {
        let mut p = default_policy();
        p.allow_cidrs = vec!["10.1.2.3/32".into()];
        let set = render("inst", &desired([("br-abc", &p)]), &[]);
        let net = set
            .chains
            .iter()
            .find(|(n, _)| n.len() > 12)
            .map(|(_, r)| r.clone())
            .unwrap();
        assert!(net[0].starts_with("-d 10.1.2.3/32 -j RETURN"));
        assert!(net[1].starts_with("-d 10.0.0.0/8 -j REJECT"));
        assert!(net
            .iter()
            .any(|r| r.starts_with("-m addrtype --dst-type LOCAL -j REJECT")));
        assert!(
            !net.iter().any(|r| r.starts_with("-j REJECT")),
            "allow mode ends open"
        );
        let top = &set.chains[&top_chain("inst")];
        assert!(top[0].starts_with("-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"));
        assert!(top[1].starts_with("-i br-abc -j SBX-"));
        let deny = EgressPolicy {
            egress: EgressMode::Deny,
            allow_cidrs: vec![],
            deny_cidrs: vec![],
        };
        let set = render(
            "inst",
            &desired([("br-x", &deny)]),
            &["10.0.0.53".parse().unwrap()],
        );
        let net = set.chains.iter().find(|(n, _)| n.len() > 12).unwrap().1;
        assert!(
            net[0].starts_with("-d 10.0.0.53/32 -p udp -m udp --dport 53 -j RETURN"),
            "DNS first: {net:?}"
        );
        assert!(set
            .chains
            .values()
            .any(|r| r.iter().any(|l| l.starts_with("-j REJECT"))));
    }

    #[test]
    fn allow_without_denials_needs_no_rules_and_merging_is_strictest() {
        let open = EgressPolicy {
            egress: EgressMode::Allow,
            allow_cidrs: vec![],
            deny_cidrs: vec![],
        };
        assert!(desired([("br-a", &open)]).is_empty());
        let mut a = default_policy();
        a.allow_cidrs = vec!["10.9.0.0/16".into(), "10.8.0.0/16".into()];
        let mut b = default_policy();
        b.egress = EgressMode::Deny;
        b.allow_cidrs = vec!["10.9.0.0/16".into()];
        b.deny_cidrs.push("8.8.8.8/32".into());
        let m = a.strictest(&b);
        assert_eq!(m.egress, EgressMode::Deny);
        assert_eq!(m.allow_cidrs, ["10.9.0.0/16"]);
        assert!(m.deny_cidrs.contains(&"8.8.8.8/32".to_string()));
        assert_eq!(desired([("br-a", &a), ("br-a", &b)])["br-a"], m);
    }

    #[test]
    fn a_jump_is_first_when_only_other_instances_jumps_precede_it() {
        let top = top_chain("i");
        let other = top_chain("other");
        let listing = |rules: &[String]| {
            let mut text = "-P FORWARD ACCEPT\n".to_string();
            for r in rules {
                text.push_str(&format!("-A FORWARD {r}\n"));
            }
            text
        };
        let jump = format!("-j {top}");
        let netavark = "-m comment --comment \"netavark\" -j NETAVARK_FORWARD".to_string();
        assert!(jump_first_in_listing(
            "i",
            "FORWARD",
            &listing(std::slice::from_ref(&jump))
        ));
        assert!(jump_first_in_listing(
            "i",
            "FORWARD",
            &listing(&[format!("-j {other}"), jump.clone(), netavark.clone()])
        ));
        assert!(!jump_first_in_listing(
            "i",
            "FORWARD",
            &listing(&[netavark.clone(), jump.clone()])
        ));
        assert!(!jump_first_in_listing(
            "i",
            "FORWARD",
            &listing(&[netavark])
        ));
        assert!(!jump_first_in_listing("i", "FORWARD", ""));
        // Another hook's rules do not count.
        assert!(!jump_first_in_listing("i", "INPUT", &listing(&[jump])));
    }

    #[test]
    fn instances_get_their_own_chains() {
        assert_ne!(top_chain("a"), top_chain("b"));
        assert!(top_chain("a").len() <= 28);
        assert!(network_chain("a", "br-0123456789ab").len() <= 28);
        assert!(is_ours(&network_chain("a", "x"), &top_chain("a")));
        assert!(!is_ours(&network_chain("b", "x"), &top_chain("a")));
    }

    #[test]
    fn the_host_copy_is_compared_by_digest_and_count() {
        let want = render("inst", &desired([("br-abc", &default_policy())]), &[]);
        let top = top_chain("inst");
        let mut saved = String::from("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\n:DOCKER-USER - [0:0]\n");
        for name in want.chains.keys() {
            saved.push_str(&format!(":{name} - [0:0]\n"));
        }
        saved.push_str(&format!(
            "-A INPUT -j {top}\n-A DOCKER-USER -j {top}\n-A DOCKER-USER -j RETURN\n"
        ));
        for (name, rules) in &want.chains {
            for r in rules {
                // iptables re-spells rules (quotes the comment, reorders matches): only the
                // digest is read back.
                let digest = r.rsplit("sbx:").next().unwrap();
                saved.push_str(&format!(
                    "-A {name} -m comment --comment \"sbx:{digest}\" -j X\n"
                ));
            }
        }
        saved.push_str("COMMIT\n");
        let found = parse_saved("inst", &saved);
        assert!(
            diff(&want, &found, false, Family::V4.hooks(DOCKER_USER)).is_empty(),
            "{:?}",
            diff(&want, &found, false, Family::V4.hooks(DOCKER_USER))
        );
        // Flushed by hand: rewritten. A jump gone: added back. Another instance: ignored.
        let flushed: String = saved
            .lines()
            .filter(|l| !l.starts_with(&format!("-A {top} ")))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(
            diff(
                &want,
                &parse_saved("inst", &flushed),
                false,
                Family::V4.hooks(DOCKER_USER)
            )
            .rewrite
        );
        let no_jump = saved.replace(&format!("-A INPUT -j {top}\n"), "");
        assert_eq!(
            diff(
                &want,
                &parse_saved("inst", &no_jump),
                false,
                Family::V4.hooks(DOCKER_USER)
            )
            .add_jumps,
            ["INPUT"]
        );
        // A rule put above the jump: the jump is moved first again, a change of its own.
        let below = saved.replace(
            &format!("-A DOCKER-USER -j {top}\n"),
            &format!("-A DOCKER-USER -s 192.0.2.1/32 -j ACCEPT\n-A DOCKER-USER -j {top}\n"),
        );
        let moved = diff(
            &want,
            &parse_saved("inst", &below),
            false,
            Family::V4.hooks(DOCKER_USER),
        );
        assert_eq!(moved.move_jumps, ["DOCKER-USER"]);
        assert!(!moved.is_empty(), "a move alone is a change");
        assert!(parse_saved("other", &saved).chains.is_empty());
        // Nothing wanted: everything of ours goes.
        assert!(
            diff(
                &Ruleset::default(),
                &found,
                true,
                Family::V4.hooks(DOCKER_USER)
            )
            .remove_all
        );
        assert!(diff(
            &Ruleset::default(),
            &Found::default(),
            true,
            Family::V4.hooks(DOCKER_USER)
        )
        .is_empty());
    }

    #[test]
    fn ipv6_rejects_everything_new_from_a_ruled_bridge() {
        let set = render_v6("inst", &desired([("br-abc", &default_policy())]));
        let top = &set.chains[&top_chain("inst")];
        assert!(top[0].starts_with("-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"));
        assert!(top[1].starts_with("-i br-abc -j REJECT"));
        assert_eq!(Family::V6.hooks(DOCKER_USER), ["FORWARD", "INPUT"]);
        assert_eq!(Family::V4.hooks("FORWARD"), ["FORWARD", "INPUT"]);
    }

    #[test]
    fn resolvers_come_from_resolv_conf_without_loopback() {
        let text = "# x\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nnameserver ::1\nsearch lan\nnameserver 10.0.0.2\n";
        assert_eq!(
            parse_resolvers(text),
            vec![std::net::Ipv4Addr::new(10, 0, 0, 2)]
        );
    }

    #[test]
    fn cidrs_are_checked() {
        assert!(check_cidr("10.0.0.0/8").is_ok());
        assert!(check_cidr("host").is_ok());
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "300.1.1.1/8",
            "fe80::/10",
            "",
            "x/1",
        ] {
            assert!(check_cidr(bad).is_err(), "{bad}");
        }
    }
}
