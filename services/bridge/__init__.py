"""The gateway bridge: webhook ingress → ``gateway.confirmations.v1`` (docs/contract.md §2.2)."""
