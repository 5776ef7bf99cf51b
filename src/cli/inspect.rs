//! `sandboxd ls`, `show`, `events`, `workspaces`, `chats`: the database read-only, for
//! operators. They work while the server runs and when it is down.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use crate::domain::{format_time, ChatId, Phase};
use crate::store::{ListFilter, SandboxRow, Store, StoredEvent};

fn human(d: chrono::Duration) -> String {
    let s = d.num_seconds();
    let (sign, s) = if s < 0 { ("-", -s) } else { ("", s) };
    match s {
        0..60 => format!("{sign}{s}s"),
        60..3600 => format!("{sign}{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{sign}{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{sign}{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

fn clip(s: &str, n: usize) -> String {
    let one_line = s.replace('\n', " ");
    if one_line.chars().count() <= n {
        one_line
    } else {
        let mut out: String = one_line.chars().take(n.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// Renders rows as aligned columns.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let pad = w.saturating_sub(cell.chars().count());
                let _ = write!(out, "{cell}{}  ", " ".repeat(pad));
            }
        }
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

fn endpoint(row: &SandboxRow) -> String {
    match (&row.endpoint_ip, row.endpoint_port) {
        (Some(ip), Some(port)) => format!("{ip}:{port}"),
        _ => "-".into(),
    }
}

pub fn render_ls(rows: &[SandboxRow], now: DateTime<Utc>) -> String {
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let expires = if r.phase == Phase::Expired {
                "expired".to_string()
            } else {
                human(r.expires_at - now)
            };
            vec![
                r.chat_id.to_string(),
                r.desired_state.to_string(),
                r.phase.to_string(),
                clip(&r.agent_id, 20),
                human(now - r.created_at),
                human(now - r.last_active_at),
                expires,
                endpoint(r),
                r.attempts.to_string(),
                r.restarts.to_string(),
                clip(r.last_error.as_deref().unwrap_or("-"), 60),
            ]
        })
        .collect();
    table(
        &[
            "CHAT_ID",
            "STATE",
            "PHASE",
            "AGENT",
            "AGE",
            "IDLE",
            "EXPIRES_IN",
            "ENDPOINT",
            "ATTEMPTS",
            "RESTARTS",
            "LAST_ERROR",
        ],
        &body,
    )
}

pub fn render_events(events: &[StoredEvent]) -> String {
    let body: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                e.at.clone(),
                e.chat_id.clone(),
                e.session_id.clone().unwrap_or_else(|| "-".into()),
                e.container_id
                    .as_deref()
                    .map(|c| clip(c, 12))
                    .unwrap_or_else(|| "-".into()),
                e.action.clone(),
                e.outcome.clone(),
                clip(e.error.as_deref().unwrap_or("-"), 80),
            ]
        })
        .collect();
    table(
        &[
            "AT",
            "CHAT_ID",
            "SESSION_ID",
            "CONTAINER",
            "ACTION",
            "OUTCOME",
            "ERROR",
        ],
        &body,
    )
}

pub fn render_show(row: &SandboxRow, events: &[StoredEvent]) -> String {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let fields = [
        ("chat_id", row.chat_id.to_string()),
        ("session_id", row.session_id.to_string()),
        ("generation", row.generation.to_string()),
        ("state", row.desired_state.to_string()),
        ("phase", row.phase.to_string()),
        ("last_active_at", format_time(row.last_active_at)),
        ("agent_id", row.agent_id.clone()),
        ("volume_host_path", row.volume_host_path.clone()),
        ("container_id", opt(row.container_id.clone())),
        ("endpoint", endpoint(row)),
        ("network", opt(row.network.clone())),
        ("created_at", format_time(row.created_at)),
        ("updated_at", format_time(row.updated_at)),
        ("expires_at", format_time(row.expires_at)),
        ("deleted_at", opt(row.deleted_at.map(format_time))),
        ("running_since", opt(row.running_since.map(format_time))),
        ("attempts", row.attempts.to_string()),
        ("restarts", row.restarts.to_string()),
        ("last_error", opt(row.last_error.clone())),
        ("next_attempt_at", opt(row.next_attempt_at.map(format_time))),
        ("spec_hash", row.spec_hash.clone()),
        ("spec", row.spec_json.clone()),
    ];
    let mut out = String::new();
    for (k, v) in fields {
        let _ = writeln!(out, "{k:<17} {v}");
    }
    let profile = crate::domain::spec::ContainerSpec::from_json(&row.spec_json)
        .ok()
        .and_then(|s| s.profile);
    match profile {
        Some(p) => {
            let _ = writeln!(out, "{:<17} {} (runtime {})", "profile", p.name, p.runtime);
            let rules = if p.egress.needs_rules() {
                p.egress.describe()
            } else {
                vec!["everything: accept (no rules)".into()]
            };
            for (i, rule) in rules.iter().enumerate() {
                let label = if i == 0 { "egress" } else { "" };
                let _ = writeln!(out, "{label:<17} {rule}");
            }
        }
        None => {
            let _ = writeln!(
                out,
                "{:<17} - (before profiles: runc, no egress rules)",
                "profile"
            );
        }
    }
    out.push_str("\nrecent events:\n");
    out.push_str(&render_events(events));
    out
}

pub async fn ls(
    store: &Store,
    phase: Option<Phase>,
    agent: Option<String>,
) -> anyhow::Result<String> {
    let mut rows = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list(&ListFilter {
                phase,
                agent_id: agent.clone(),
                after,
                limit: 1000,
            })
            .await?;
        let full = page.len() == 1000;
        after = page.last().map(|r| r.chat_id);
        rows.extend(page);
        if !full {
            break;
        }
    }
    Ok(render_ls(&rows, Utc::now()))
}

pub async fn show(store: &Store, chat_id: ChatId) -> anyhow::Result<String> {
    let row = store
        .get(chat_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no sandbox for chat {chat_id}"))?;
    let events = store.events(Some(chat_id), 20).await?;
    Ok(render_show(&row, &events))
}

/// Bytes as a person reads them (binary units).
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

/// `sandboxd workspaces`: each workspace with its quota, what its file system has in use
/// (`-` when it is not mounted) and its chats.
pub async fn workspaces(
    store: &Store,
    storage: &crate::storage::ChatStorage,
    user: Option<&str>,
) -> anyhow::Result<String> {
    let now = Utc::now();
    let chats = store.chats(None).await?;
    let rows: Vec<Vec<String>> = store
        .workspaces(user)
        .await?
        .iter()
        .map(|w| {
            let used = storage
                .usage(w.workspace_id, w.quota_bytes)
                .map_or_else(|_| "-".to_string(), |u| bytes(u.used_bytes));
            let n = chats
                .iter()
                .filter(|c| c.workspace_id == w.workspace_id)
                .count();
            vec![
                w.workspace_id.to_string(),
                clip(&w.user_id, 24),
                bytes(w.quota_bytes),
                used,
                n.to_string(),
                human(now - w.created_at),
            ]
        })
        .collect();
    Ok(table(
        &["WORKSPACE_ID", "USER", "QUOTA", "USED", "CHATS", "AGE"],
        &rows,
    ))
}

/// `sandboxd chats`: each chat with its workspace, attachments and its sandbox's phase.
pub async fn chats(
    store: &Store,
    workspace: Option<crate::domain::storage::WorkspaceId>,
) -> anyhow::Result<String> {
    let now = Utc::now();
    let mut rows = Vec::new();
    for c in store.chats(workspace).await? {
        let files = store.files(c.chat_id).await?;
        let size: u64 = files.iter().map(|f| f.size_bytes).sum();
        let sandbox = store
            .get(c.chat_id)
            .await?
            .map_or_else(|| "-".to_string(), |r| r.phase.to_string());
        rows.push(vec![
            c.chat_id.to_string(),
            c.workspace_id.to_string(),
            human(now - c.created_at),
            files.len().to_string(),
            bytes(size),
            sandbox,
        ]);
    }
    Ok(table(
        &[
            "CHAT_ID",
            "WORKSPACE_ID",
            "AGE",
            "FILES",
            "FILE_BYTES",
            "SANDBOX",
        ],
        &rows,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(bytes(0), "0B");
        assert_eq!(bytes(1023), "1023B");
        assert_eq!(bytes(8 << 20), "8.0MiB");
        assert_eq!(bytes(1536 << 20), "1.5GiB");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human(chrono::Duration::seconds(5)), "5s");
        assert_eq!(human(chrono::Duration::seconds(125)), "2m5s");
        assert_eq!(human(chrono::Duration::seconds(7260)), "2h1m");
        assert_eq!(human(chrono::Duration::seconds(-90)), "-1m30s");
        assert_eq!(human(chrono::Duration::seconds(90000)), "1d1h");
    }

    #[test]
    fn columns_align() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
        assert_eq!(clip("abcdef", 4), "abc…");
    }
}
