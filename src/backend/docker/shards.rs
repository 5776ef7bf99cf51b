//! Sandbox networks beside a full one (`controller/networks.rs` decides when): made with the
//! base network's settings, labelled as this instance's shard, removed when unused.

use std::collections::HashMap;

use bollard::models::{Ipam, NetworkCreateRequest};

use super::DockerRuntime;
use crate::backend::error::{BackendError, ErrorKind, Result};
use crate::backend::{labels, ShardedNetworks};

/// Options naming one network's own interface: a shard gets its own.
const OWN_OPTIONS: [&str; 1] = ["com.docker.network.bridge.name"];

#[async_trait::async_trait]
impl ShardedNetworks for DockerRuntime {
    async fn ensure_shard(&self, base: &str, name: &str) -> Result<()> {
        if self.engine.network_brief(name).await?.is_some() {
            return Ok(());
        }
        let model = self.engine.network_brief(base).await?.ok_or_else(|| {
            BackendError::new(
                ErrorKind::NotFound,
                format!("network `{base}` not found: its shard `{name}` copies its settings"),
            )
        })?;
        let mut options = model.options;
        options.retain(|k, _| !OWN_OPTIONS.contains(&k.as_str()));
        let mut found_labels = model.labels;
        found_labels.insert(labels::MANAGED.into(), "true".into());
        found_labels.insert(labels::INSTANCE.into(), self.engine.instance.clone());
        found_labels.insert(labels::SHARD_OF.into(), base.into());
        self.engine
            .create_network(NetworkCreateRequest {
                name: name.to_string(),
                driver: model.driver,
                internal: model.internal,
                attachable: model.attachable,
                enable_ipv6: model.enable_ipv6,
                options: Some(options),
                labels: Some(found_labels),
                // The same IPAM driver, a subnet of its own from the engine's pools.
                ipam: Some(Ipam {
                    driver: model.ipam.and_then(|i| i.driver),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
    }

    async fn address_room(&self, network: &str) -> Result<Option<Option<u32>>> {
        let Some(n) = self.engine.network_brief(network).await? else {
            return Ok(None);
        };
        let subnets: Vec<String> = n
            .ipam
            .and_then(|i| i.config)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|c| c.subnet)
            .collect();
        Ok(Some(ipv4_room(&subnets)))
    }

    async fn shards(&self) -> Result<Vec<(String, String)>> {
        let filters = HashMap::from([(
            "label",
            vec![
                format!("{}={}", labels::INSTANCE, self.engine.instance),
                labels::SHARD_OF.to_string(),
            ],
        )]);
        Ok(self
            .engine
            .networks_matching(filters)
            .await?
            .into_iter()
            .filter_map(|n| {
                let base = n.labels?.get(labels::SHARD_OF)?.clone();
                Some((n.name?, base))
            })
            .collect())
    }

    async fn remove_if_unused(&self, name: &str) -> Result<bool> {
        let on = self
            .list_matching(HashMap::from([("network", vec![name.to_string()])]))
            .await?;
        if !on.is_empty() {
            return Ok(false);
        }
        self.remove_network(name).await.map(|()| true)
    }
}

impl DockerRuntime {
    /// Removes a network; one already gone counts as removed.
    pub(crate) async fn remove_network(&self, name: &str) -> Result<()> {
        match self
            .call(
                "remove_network",
                &[404],
                self.engine.docker.remove_network(name),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if super::status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err(BackendError::engine("remove_network", e)),
        }
    }
}

/// The container addresses of a network's IPv4 subnets (network, gateway and broadcast
/// taken off each); `None` without an IPv4 subnet (nothing known bounds it).
pub(crate) fn ipv4_room(subnets: &[String]) -> Option<u32> {
    let mut room: Option<u64> = None;
    for subnet in subnets {
        let Some((addr, bits)) = subnet.split_once('/') else {
            continue;
        };
        let (Ok(_), Ok(bits)) = (addr.parse::<std::net::Ipv4Addr>(), bits.parse::<u32>()) else {
            continue;
        };
        if bits > 32 {
            continue;
        }
        let size = 1u64 << (32 - bits);
        *room.get_or_insert(0) += size.saturating_sub(3);
    }
    room.map(|r| u32::try_from(r).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::ipv4_room;

    #[test]
    fn room_is_the_ipv4_addresses_left_for_containers() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(ipv4_room(&v(&["10.89.0.0/24"])), Some(253));
        assert_eq!(ipv4_room(&v(&["172.18.0.0/16"])), Some(65533));
        assert_eq!(ipv4_room(&v(&["10.0.0.0/30"])), Some(1));
        assert_eq!(
            ipv4_room(&v(&["10.1.0.0/24", "fd00::/64"])),
            Some(253),
            "IPv6 subnets do not bound it"
        );
        assert_eq!(ipv4_room(&v(&["fd00::/64"])), None);
        assert_eq!(ipv4_room(&v(&[])), None);
        assert_eq!(ipv4_room(&v(&["garbage", "10.0.0.0/40"])), None);
    }
}
