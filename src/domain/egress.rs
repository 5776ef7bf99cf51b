//! A sandbox's egress policy, as its profile states it and its spec freezes it (pure). How
//! it becomes host firewall rules is `crate::egress`'s; the domain knows only the policy.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// The word in `deny_cidrs` / `allow_cidrs` that means "every address of the host itself".
pub const HOST: &str = "host";

/// The default `deny_cidrs`: private ranges (RFC 1918), shared address space (RFC 6598),
/// link-local (cloud metadata at 169.254.169.254 among them) and the host's own addresses.
pub const DEFAULT_DENY: [&str; 6] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    HOST,
];

/// `allow`: everything but `deny_cidrs`; `deny`: nothing but `allow_cidrs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EgressMode {
    Allow,
    Deny,
}

/// One profile's egress policy, as frozen in a session's spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressPolicy {
    pub egress: EgressMode,
    /// CIDRs (or `host`) a sandbox may reach even when denied otherwise. Checked first.
    #[serde(default)]
    pub allow_cidrs: Vec<String>,
    #[serde(default)]
    pub deny_cidrs: Vec<String>,
}

impl EgressPolicy {
    /// Sorted, without repeats: equal policies render equal rules.
    pub fn canonical(&self) -> EgressPolicy {
        let sorted = |v: &Vec<String>| {
            v.iter()
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        EgressPolicy {
            egress: self.egress,
            allow_cidrs: sorted(&self.allow_cidrs),
            deny_cidrs: sorted(&self.deny_cidrs),
        }
    }

    /// Whether any rule is needed (`allow` with nothing denied needs none).
    pub fn needs_rules(&self) -> bool {
        self.egress == EgressMode::Deny || !self.deny_cidrs.is_empty()
    }

    /// The strictest combination of two policies on one network (only after a config change
    /// can sessions on one network carry different ones): deny wins, denials add up, only
    /// exceptions both allow stay.
    pub fn strictest(&self, other: &EgressPolicy) -> EgressPolicy {
        let union: BTreeSet<&String> = self.deny_cidrs.iter().chain(&other.deny_cidrs).collect();
        let theirs: BTreeSet<&String> = other.allow_cidrs.iter().collect();
        EgressPolicy {
            egress: self.egress.max(other.egress),
            allow_cidrs: self
                .allow_cidrs
                .iter()
                .filter(|c| theirs.contains(c))
                .cloned()
                .collect(),
            deny_cidrs: union.into_iter().cloned().collect(),
        }
        .canonical()
    }

    /// The effective rules in words (for the view and `sandboxd show`).
    pub fn describe(&self) -> Vec<String> {
        let mut out = vec![
            "established and related traffic: accept".to_string(),
            "DNS (port 53) to the host's resolvers: accept".to_string(),
        ];
        out.extend(self.allow_cidrs.iter().map(|c| format!("{c}: accept")));
        out.extend(self.deny_cidrs.iter().map(|c| format!("{c}: reject")));
        out.push(match self.egress {
            EgressMode::Allow => "anything else (IPv4): accept".into(),
            EgressMode::Deny => "anything else (IPv4): reject".into(),
        });
        out.push("IPv6: reject".into());
        out
    }
}

/// Checks a `deny_cidrs`/`allow_cidrs` entry: `host` or an IPv4 CIDR (`a.b.c.d/n`).
pub fn check_cidr(entry: &str) -> Result<(), String> {
    if entry == HOST {
        return Ok(());
    }
    let (addr, len) = entry
        .split_once('/')
        .ok_or_else(|| format!("`{entry}` is not a CIDR (a.b.c.d/n) or `host`"))?;
    addr.parse::<std::net::Ipv4Addr>()
        .map_err(|_| format!("`{entry}`: `{addr}` is not an IPv4 address"))?;
    match len.parse::<u8>() {
        Ok(n) if n <= 32 => Ok(()),
        _ => Err(format!("`{entry}`: prefix length must be 0..=32")),
    }
}
