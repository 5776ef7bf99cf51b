//! The host firewall adapter: `iptables-save`, `iptables-restore --noflush` and `iptables`
//! (the nf_tables or legacy backend, whichever the host's `iptables` is). Every call waits
//! for the xtables lock (`-w`). Only chains of the instance (`SBX-<hash>…`) and the two jumps
//! to its top chain are ever written.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::{top_chain, Changes, Family, Found, Ruleset};

/// A firewall call that failed: the host cannot apply rules (no iptables, no privilege, no
/// `DOCKER-USER` chain).
#[derive(Debug, Clone, thiserror::Error)]
#[error("egress rules cannot be applied: {0}")]
pub struct FirewallError(pub String);

type Result<T> = std::result::Result<T, FirewallError>;

async fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| FirewallError(format!("{program}: {e}")))?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input
            .write_all(text.as_bytes())
            .await
            .map_err(|e| FirewallError(format!("{program}: {e}")))?;
        drop(input);
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| FirewallError(format!("{program}: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(FirewallError(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Whether the host has IPv6 at all (without it there is nothing to filter, and
/// `ip6tables` may not work).
pub fn host_has_ipv6() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}

/// The filter table as the host has it, reduced to the instance's chains and jumps.
pub async fn read(instance: &str, family: Family) -> Result<Found> {
    let save = format!("{}-save", family.tool());
    let saved = run(&save, &["-t", "filter"], None).await?;
    Ok(super::parse_saved(instance, &saved))
}

/// Whether the instance's jump is first in `hook` (other instances' jumps ahead of it do not
/// count, as in [`super::parse_saved`]): one chain listed (`-S`), far cheaper than reading
/// the table back, for the check after every start.
pub async fn jump_is_first(instance: &str, family: Family, hook: &str) -> Result<bool> {
    let listed = run(family.tool(), &["-w", "-S", hook], None).await?;
    Ok(super::jump_first_in_listing(instance, hook, &listed))
}

/// Makes the host match: rewrites the chains and adds missing jumps (first in their hook,
/// before Docker's own `RETURN`) in one atomic `iptables-restore`, then drops chains no
/// longer wanted.
pub async fn apply(
    instance: &str,
    wanted: &Ruleset,
    changes: &Changes,
    family: Family,
) -> Result<()> {
    let top = top_chain(instance);
    let (tool, restore) = (family.tool(), format!("{}-restore", family.tool()));
    if changes.remove_all {
        return remove_family(instance, family).await;
    }
    if changes.rewrite || !changes.add_jumps.is_empty() || !changes.move_jumps.is_empty() {
        let input = wanted.restore_input(
            changes.rewrite,
            &top,
            &changes.add_jumps,
            &changes.move_jumps,
        );
        run(&restore, &["-w", "--noflush"], Some(&input)).await?;
    }
    for chain in &changes.drop_chains {
        // No longer referenced: the rewrite above removed its jump.
        run(tool, &["-w", "-F", chain], None).await?;
        run(tool, &["-w", "-X", chain], None).await?;
    }
    Ok(())
}

/// Removes every rule of the instance, IPv4 and IPv6: the jumps, then its chains.
pub async fn remove(instance: &str) -> Result<()> {
    remove_family(instance, Family::V4).await?;
    if host_has_ipv6() {
        remove_family(instance, Family::V6).await?;
    }
    Ok(())
}

async fn remove_family(instance: &str, family: Family) -> Result<()> {
    let (top, tool) = (top_chain(instance), family.tool());
    let found = read(instance, family).await?;
    for hook in found.jumps.keys() {
        run(tool, &["-w", "-D", hook, "-j", &top], None).await?;
    }
    for chain in found.chains.keys() {
        run(tool, &["-w", "-F", chain], None).await?;
    }
    for chain in found.chains.keys() {
        run(tool, &["-w", "-X", chain], None).await?;
    }
    Ok(())
}
