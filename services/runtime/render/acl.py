"""``--format acl``: ``kafka-acls.sh`` commands (``deploy/kafka-acls.sh``)."""

from __future__ import annotations

from pathlib import Path

from services.runtime.render.model import accesses, header
from services.runtime.topics import TOPICS_FILE


def render(path: Path = TOPICS_FILE) -> str:
    """``kafka-acls.sh`` commands granting each user exactly its access (a cluster
    without Strimzi: create the SCRAM users, then run these with an admin's config)."""
    lines = [
        header().rstrip(),
        "# BOOTSTRAP (the brokers) and ADMIN_CONFIG (a client config file of an admin user):",
        "#   BOOTSTRAP=... ADMIN_CONFIG=admin.properties sh deploy/kafka-acls.sh",
        'set -eu\n: "${BOOTSTRAP:?}" "${ADMIN_CONFIG:?}"',
    ]
    for a in accesses(path):
        lines.append(f"\n# {a.user}")
        for rtype, name, ops in a.acls():
            resource = {"topic": f"--topic {name}", "group": f"--group {name}"}.get(
                rtype, "--cluster"
            )
            operations = " ".join(f"--operation {op}" for op in ops)
            lines.append(
                'kafka-acls.sh --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG"'
                f" --add --allow-principal User:{a.user} {operations} {resource}"
            )
    return "\n".join(lines) + "\n"
