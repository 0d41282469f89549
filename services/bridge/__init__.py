"""The gateway bridge: webhook ingress → ``gateway.confirmations.v1`` (CONTRACT §2.2)."""
