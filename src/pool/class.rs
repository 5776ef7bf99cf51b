//! What makes pool members interchangeable, and what a claim hands the agent. Pure.

use std::collections::BTreeMap;

use crate::domain::spec::{ContainerSpec, MountKind};

/// Where a member sees its slot's claim directory (the FIFO `go` and the file `env`).
pub const CLAIM_DIR: &str = "/run/sandboxd-claim";

/// The member's entrypoint: wait for the claim (a line on the FIFO), take the chat's
/// environment, then run the image's own entrypoint and command (its arguments). The agent
/// starts only after the claim; a FIFO closed without a line ends the member. A claimed
/// member started again (a resume after hibernation) has its `env` already (the claim writes
/// it before the line) and does not wait.
pub const WRAPPER: &str =
    "{ [ -e /run/sandboxd-claim/env ] || read -r _ < /run/sandboxd-claim/go; } \
     && . /run/sandboxd-claim/env && exec \"$@\"";

/// The spec with its per-chat parts blanked (the chat directory's and the volume's sources,
/// `AGENT_ID`): sessions whose specs agree on the rest can take the same member.
pub fn class_of(spec: &ContainerSpec) -> ContainerSpec {
    let mut class = spec.clone();
    for m in &mut class.mounts {
        if matches!(m.kind, MountKind::Chat | MountKind::Volume) {
            m.source.clear();
        }
    }
    class.env.remove("AGENT_ID");
    class
}

/// The class a spec belongs to.
pub fn class_hash(spec: &ContainerSpec) -> String {
    class_of(spec).hash()
}

/// Why a spec cannot be bound at claim time (its env cannot be exported by `sh`).
pub fn env_problem(env: &BTreeMap<String, String>) -> Option<String> {
    env.keys()
        .find(|k| !is_shell_name(k))
        .map(|k| format!("env key `{k}` is not a shell variable name"))
}

fn is_shell_name(k: &str) -> bool {
    let mut chars = k.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The claim's env file: one `export KEY='value'` per variable, values single-quoted (a
/// quote inside becomes `'\''`), so nothing in a value is interpreted.
pub fn env_script(env: &BTreeMap<String, String>) -> String {
    env.iter()
        .map(|(k, v)| format!("export {k}='{}'\n", v.replace('\'', "'\\''")))
        .collect()
}

/// The member's entrypoint and command: the wrapper, then the image's own.
pub fn wrapped_command(
    image_entrypoint: &[String],
    image_cmd: &[String],
) -> Option<(Vec<String>, Vec<String>)> {
    let own: Vec<String> = image_entrypoint.iter().chain(image_cmd).cloned().collect();
    if own.is_empty() {
        return None;
    }
    let entrypoint = vec![
        "/bin/sh".to_string(),
        "-c".to_string(),
        WRAPPER.to_string(),
        "sandboxd-warm".to_string(),
    ];
    Some((entrypoint, own))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::spec::tests_support::spec_with_profile;
    use crate::egress::EgressMode;

    #[test]
    fn chats_and_agents_do_not_change_the_class_but_the_rest_does() {
        let a = spec_with_profile("runc", EgressMode::Allow, &[]);
        let mut b = a.clone();
        b.mounts[0].source = "/other/chat".into();
        b.mounts[1].source = "/other/volume".into();
        b.env.insert("AGENT_ID".into(), "agent-2".into());
        assert_eq!(class_hash(&a), class_hash(&b));
        let mut c = a.clone();
        c.hardening.memory_mb += 1;
        assert_ne!(class_hash(&a), class_hash(&c));
        let mut d = a.clone();
        d.mounts[2].source = "/other/deps".into();
        assert_ne!(class_hash(&a), class_hash(&d));
    }

    #[test]
    fn env_values_are_quoted_so_nothing_is_interpreted() {
        let env = BTreeMap::from([
            ("AGENT_ID".to_string(), "a'b $(x) `y`".to_string()),
            ("N".to_string(), "1".to_string()),
        ]);
        assert_eq!(
            env_script(&env),
            "export AGENT_ID='a'\\''b $(x) `y`'\nexport N='1'\n"
        );
        assert_eq!(env_problem(&env), None);
        let bad = BTreeMap::from([("A-B".to_string(), "1".to_string())]);
        assert!(env_problem(&bad).is_some());
    }

    #[test]
    fn the_wrapper_runs_the_images_own_command() {
        let (ep, cmd) = wrapped_command(&[], &["/bin/sh".into(), "-c".into(), "httpd".into()])
            .expect("a command");
        assert_eq!(ep[0], "/bin/sh");
        assert_eq!(ep[2], WRAPPER);
        assert_eq!(cmd, vec!["/bin/sh", "-c", "httpd"]);
        assert!(wrapped_command(&[], &[]).is_none());
    }
}
