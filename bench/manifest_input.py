#!/usr/bin/env python3
"""`netfence compile -f CLUSTER` end to end, against the parse alone, on a cluster dump.

Writes bench/compile.py's synthetic cluster (default 10,000 pods, 2,000 policies, 200
namespaces, 20 nodes) as one file the way users make them (`kubectl get -o yaml` as one
multi-document YAML file, `kubectl get -o json` as a `kind: List`), then times, per format:

  parse:   yaml.load_all(text, CSafeLoader) (json.loads for JSON) in this process
  compile: `netfence compile -f FILE -o json > /dev/null` as a fresh process, as users run it

and prints the ratio compile / parse (issue 14's target: compile ≤ 3 × CSafeLoader on the YAML
file, in the same run). Each figure is the median of --repeat runs.

    .venv/bin/python bench/manifest_input.py [--pods 10000 ...] [--repeat 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "operator"), str(HERE.parent / "agent")]

import yaml  # noqa: E402

from compile import add_cluster_arguments, synthetic_documents  # noqa: E402
from netfence_api.manifests import SafeLoader, dump_yaml_all  # noqa: E402


def median_seconds(run, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def netfence_command() -> list[str]:
    local = HERE.parent / ".venv" / "bin" / "netfence"
    return [str(local)] if local.exists() else [sys.executable, "-m", "netfence_cli"]


def main() -> None:
    ap = argparse.ArgumentParser()
    add_cluster_arguments(ap)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", help="write the files here and keep them")
    args = ap.parse_args()

    docs = list(synthetic_documents(args.pods, args.policies, args.namespaces, args.nodes))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        files = {"yaml": folder / "cluster.yaml", "json": folder / "cluster.json"}
        files["yaml"].write_text(dump_yaml_all(docs))
        files["json"].write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}, indent=4))
        print(f"cluster: {args.pods} pods, {args.policies} policies, {args.namespaces} namespaces, {args.nodes} nodes; "
              f"YAML {files['yaml'].stat().st_size / 1e6:.1f} MB, JSON {files['json'].stat().st_size / 1e6:.1f} MB; "
              f"median of {args.repeat}")
        parsers = {
            "yaml": lambda: list(yaml.load_all(files["yaml"].read_text(), Loader=SafeLoader)),
            "json": lambda: json.loads(files["json"].read_text()),
        }
        command = netfence_command()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent / "operator"), str(HERE.parent / "agent")]))
        baseline = None
        for fmt, path in files.items():
            parse = median_seconds(parsers[fmt], args.repeat)
            baseline = baseline or parse

            def compile_file() -> None:
                subprocess.run([*command, "compile", "-f", str(path), "-o", "json"], check=True, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

            end_to_end = median_seconds(compile_file, args.repeat)
            print(f"{fmt:4}: parse {parse:6.2f} s   netfence compile -f end to end {end_to_end:6.2f} s   "
                  f"= {end_to_end / baseline:4.2f} x the YAML parse with CSafeLoader   (target <= 3 x for YAML)")


if __name__ == "__main__":
    main()
