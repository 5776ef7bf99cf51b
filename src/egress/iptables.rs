//! The host firewall adapter: `iptables-save`, `iptables-restore --noflush` and `iptables`
//! (the nf_tables or legacy backend, whichever the host's `iptables` is). Every call waits
//! for the xtables lock (`-w`). Only chains of the instance (`SBX-<hash>…`) and the two jumps
//! to its top chain are ever written.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::{top_chain, Changes, Found, Ruleset, HOOKS};

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

/// The filter table as the host has it, reduced to the instance's chains and jumps.
pub async fn read(instance: &str) -> Result<Found> {
    let saved = run("iptables-save", &["-t", "filter"], None).await?;
    Ok(super::parse_saved(instance, &saved))
}

/// Makes the host match: rewrites the chains and adds missing jumps (first in their hook,
/// before Docker's own `RETURN`) in one atomic `iptables-restore`, then drops chains no
/// longer wanted.
pub async fn apply(instance: &str, wanted: &Ruleset, changes: &Changes) -> Result<()> {
    let top = top_chain(instance);
    if changes.remove_all {
        return remove(instance).await;
    }
    if changes.rewrite || !changes.add_jumps.is_empty() {
        let input = wanted.restore_input(changes.rewrite, &top, &changes.add_jumps);
        run("iptables-restore", &["-w", "--noflush"], Some(&input)).await?;
    }
    for chain in &changes.drop_chains {
        // No longer referenced: the rewrite above removed its jump.
        run("iptables", &["-w", "-F", chain], None).await?;
        run("iptables", &["-w", "-X", chain], None).await?;
    }
    Ok(())
}

/// Removes every rule of the instance: the jumps, then its chains.
pub async fn remove(instance: &str) -> Result<()> {
    let top = top_chain(instance);
    let found = read(instance).await?;
    for hook in HOOKS {
        if found.jumps.contains(hook) {
            run("iptables", &["-w", "-D", hook, "-j", &top], None).await?;
        }
    }
    for chain in found.chains.keys() {
        run("iptables", &["-w", "-F", chain], None).await?;
    }
    for chain in found.chains.keys() {
        run("iptables", &["-w", "-X", chain], None).await?;
    }
    Ok(())
}
