"""Regenerate ``rollout_pb2.py``, ``rollout_pb2.pyi`` and ``rollout_pb2_grpc.py`` from ``rollout.proto``.

Run from anywhere: ``python protos/generate.py``. The proto is compiled relative to the repository
root (``-I <root> protos/rollout.proto``), so the generated service module imports
``from protos import rollout_pb2`` and works from the root or an installed tree.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO = os.path.join("protos", "rollout.proto")
GENERATED = ("rollout_pb2.py", "rollout_pb2.pyi", "rollout_pb2_grpc.py")
# grpcio-tools stamps its own version as the minimum grpcio runtime, which would refuse to import on a
# slightly older grpcio (the GPU machines run 1.84). The stubs only need registered-method support.
MIN_GRPC_RUNTIME = "1.66.0"


def generate(out_root: str = REPO_ROOT) -> list[str]:
    """Compile the proto into ``out_root/protos/`` and return the written file paths."""
    import grpc_tools
    from grpc_tools import protoc

    os.makedirs(os.path.join(out_root, "protos"), exist_ok=True)
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        os.path.join(REPO_ROOT, PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    grpc_path = os.path.join(out_root, "protos", "rollout_pb2_grpc.py")
    with open(grpc_path) as f:
        text = f.read()
    text, count = re.subn(
        r"GRPC_GENERATED_VERSION = '[^']*'", f"GRPC_GENERATED_VERSION = '{MIN_GRPC_RUNTIME}'", text
    )
    if count != 1:
        raise RuntimeError("unexpected generated service module: no GRPC_GENERATED_VERSION line")
    with open(grpc_path, "w") as f:
        f.write(text)
    return [os.path.join(out_root, "protos", name) for name in GENERATED]


def main(argv: list[str] | None = None) -> int:
    """Command line entry: regenerate in place (or under ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=REPO_ROOT, help="root to write protos/*.py under")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
