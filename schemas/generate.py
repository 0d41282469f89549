"""Write the JSON Schema of every model to `schemas/json/<Name>.json`, and the AsyncAPI
document of every topic to `schemas/asyncapi.yaml` (see `schemas.asyncapi`).

`python -m schemas.generate` rewrites the files; `python -m schemas.generate --check`
writes nothing and exits 1 listing every drifted file (changed, missing or stale), so
CI catches a model change whose schema was not regenerated. Output is deterministic:
sorted keys, two-space indent, trailing newline.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel

from schemas import asyncapi
from schemas.contract import GatewayWebhook
from schemas.envelope import Envelope
from schemas.events import EVENT_TYPES

__all__ = ["JSON_DIR", "check", "main", "render", "write"]

JSON_DIR = Path(__file__).resolve().parent / "json"


def render() -> dict[str, str]:
    """File name -> schema text for the envelope, every event type and the webhook."""
    models: dict[str, type[BaseModel]] = {
        "Envelope": Envelope,
        **EVENT_TYPES,
        "GatewayWebhook": GatewayWebhook,
    }
    return {
        f"{name}.json": json.dumps(
            model.model_json_schema(), indent=2, sort_keys=True, ensure_ascii=False
        )
        + "\n"
        for name, model in sorted(models.items())
    }


def write(directory: Path = JSON_DIR) -> list[Path]:
    """Make `directory` hold exactly the rendered schemas; return the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    rendered = render()
    for stale in directory.glob("*.json"):
        if stale.name not in rendered:
            stale.unlink()
    written = []
    for name, text in rendered.items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def check(directory: Path = JSON_DIR) -> list[str]:
    """Names of files in `directory` that differ from, lack or are not in `render()`."""
    rendered = render()
    drifted = [
        name
        for name, text in rendered.items()
        if not (directory / name).is_file()
        or (directory / name).read_text(encoding="utf-8") != text
    ]
    drifted += [path.name for path in directory.glob("*.json") if path.name not in rendered]
    return sorted(drifted)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schemas.generate", description=__doc__)
    parser.add_argument("--check", action="store_true", help="report drift, write nothing")
    args = parser.parse_args(argv)
    if args.check:
        drifted = [JSON_DIR / name for name in check()]
        if asyncapi.render() != _read(asyncapi.ASYNCAPI_FILE):
            drifted.append(asyncapi.ASYNCAPI_FILE)
        for path in drifted:
            print(f"drifted: {path}", file=sys.stderr)
        if drifted:
            print("run: python -m schemas.generate", file=sys.stderr)
        return 1 if drifted else 0
    for path in write():
        print(path)
    asyncapi.ASYNCAPI_FILE.write_text(asyncapi.render(), encoding="utf-8")
    print(asyncapi.ASYNCAPI_FILE)
    return 0


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


if __name__ == "__main__":
    sys.exit(main())
