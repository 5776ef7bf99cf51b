#!/usr/bin/env bash
# Removes the egress rules of a sandboxd instance (`controller.instance`, default `default`):
# the jumps from DOCKER-USER (docker) or FORWARD (podman) and INPUT to its chain
# SBX-<first 8 hex of sha256(instance)>, then that chain and its per-network chains. The rules
# outlive sandboxd on purpose (a restart must not open a gap); use this after retiring an
# instance for good. Touches no other chain.
set -euo pipefail
instance="${1:-default}"
top="SBX-$(printf '%s' "$instance" | sha256sum | cut -c1-8)"
for tool in iptables ip6tables; do
  command -v "$tool" >/dev/null 2>&1 || continue
  for hook in DOCKER-USER FORWARD INPUT; do
    while "$tool" -w -D "$hook" -j "$top" 2>/dev/null; do :; done
  done
  chains="$("$tool" -w -S 2>/dev/null | awk -v t="$top" '$1 == "-N" && ($2 == t || index($2, t "-") == 1) {print $2}')"
  for c in $chains; do "$tool" -w -F "$c"; done
  for c in $chains; do "$tool" -w -X "$c"; done
done
