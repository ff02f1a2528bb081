#!/usr/bin/env python3
"""Renders, lints and schema-checks the confroute Helm chart with Helm's own Go library
(PyPI helm-python-sdk bundles it as libhelm_c; no helm binary, no cluster, no network).

    chart.py render CHART VALUES.json OUTDIR   one file per manifest: NNN-<kind>-<name>.yaml and .json
    chart.py lint CHART VALUES.json            `helm lint --strict`; prints findings, exit 1 on any
    chart.py schema CHART VALUES.json          values.schema.json check; exit 1 with the message
    chart.py values CHART                      the chart's default values as JSON

Exit codes: 0 ok, 1 the check failed, 2 bad usage or the library is missing.
"""

import json
import os
import sys

try:
    import helm_python as helm
    import yaml
except ImportError as e:  # the Rust tests print the install command
    print(f"missing Python package: {e}; run tests/deploy/install-tools", file=sys.stderr)
    sys.exit(2)

RELEASE = "confroute"
NAMESPACE = "voice"


def load_values(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def render(chart_dir, values_path, out_dir):
    values = load_values(values_path)
    with helm.Chart.load(chart_dir) as chart:
        # Helm validates the values against values.schema.json before rendering, as install does.
        chart.validate_schema(values)
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    os.makedirs(out_dir, exist_ok=True)
    n = 0
    summary = []
    for template in sorted(files):
        if template.endswith("NOTES.txt"):
            with open(os.path.join(out_dir, "NOTES.txt"), "w", encoding="utf-8") as f:
                f.write(files[template])
            continue
        for doc in yaml.safe_load_all(files[template]):
            if not doc:
                continue
            n += 1
            stem = f"{n:03d}-{doc['kind']}-{doc['metadata']['name']}"
            with open(os.path.join(out_dir, stem + ".yaml"), "w", encoding="utf-8") as f:
                yaml.safe_dump(doc, f, sort_keys=False)
            with open(os.path.join(out_dir, stem + ".json"), "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1)
            summary.append({"file": stem, "template": template, "kind": doc["kind"],
                            "apiVersion": doc["apiVersion"], "name": doc["metadata"]["name"]})
    json.dump(summary, sys.stdout, indent=1)
    print()


def lint(chart_dir, values_path):
    report = helm.lint(chart_dir, load_values(values_path), strict=True, namespace=NAMESPACE)
    findings = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    findings += [{"severity": 3, "path": "", "error": e} for e in report.get("errors", [])]
    json.dump(report, sys.stdout, indent=1)
    print()
    if findings:
        for m in findings:
            print(f"lint: {m.get('path')}: {m.get('error')}", file=sys.stderr)
        sys.exit(1)


def schema(chart_dir, values_path):
    with helm.Chart.load(chart_dir) as chart:
        try:
            chart.validate_schema(load_values(values_path))
        except helm.HelmError as e:
            print(str(e))
            sys.exit(1)
    print("ok")


def values(chart_dir):
    with helm.Chart.load(chart_dir) as chart:
        json.dump(chart.values, sys.stdout, indent=1)
    print()


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    cmd, chart_dir = argv[1], argv[2]
    try:
        if cmd == "render" and len(argv) == 5:
            render(chart_dir, argv[3], argv[4])
        elif cmd == "lint" and len(argv) == 4:
            lint(chart_dir, argv[3])
        elif cmd == "schema" and len(argv) == 4:
            schema(chart_dir, argv[3])
        elif cmd == "values" and len(argv) == 3:
            values(chart_dir)
        else:
            print(__doc__, file=sys.stderr)
            sys.exit(2)
    except helm.HelmError as e:
        print(f"helm: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv)
