"""deploy/: the Kubernetes manifests parse as YAML and hang together (no cluster
runs here), the campaign in the ConfigMap loads, and the GNU parallel example
is valid bash."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from emailpers.campaign import load_campaign
from emailpers.shards import parse_shard

yaml = pytest.importorskip("yaml", reason="PyYAML is in the test extra: pip install -e '.[test]'")

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def documents() -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def test_the_indexed_job_runs_one_shard_per_index() -> None:
    docs = documents()
    (job,) = [d for (kind, _), d in docs.items() if kind == "Job"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["backoffLimitPerIndex"] >= 1
    container = spec["template"]["spec"]["containers"][0]
    args = container["args"]
    shard = parse_shard(args[args.index("--shard") + 1], {"JOB_COMPLETION_INDEX": str(spec["completions"] - 1)})
    assert shard.count == spec["completions"] == spec["parallelism"]
    # The backend URL names the Redis Service, on its port.
    backend = args[args.index("--backend") + 1]
    host, port = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", backend).groups()  # type: ignore[union-attr]
    service = docs[("Service", host)]
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    deployment = docs[("Deployment", host)]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    # Campaign from the ConfigMap, secrets from the Secret, --out on a volume every pod mounts.
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    campaign = Path(args[1])
    assert ("ConfigMap", volumes[mounts[str(campaign.parent)]]["configMap"]["name"]) in docs
    out = args[args.index("--out") + 1]
    claim = volumes[mounts["/" + out.split("/")[1]]]["persistentVolumeClaim"]["claimName"]
    assert docs[("PersistentVolumeClaim", claim)]["spec"]["accessModes"] == ["ReadWriteMany"]
    (secret_ref,) = container["envFrom"]
    assert ("Secret", secret_ref["secretRef"]["name"]) in docs


def test_the_configmaps_campaign_loads(tmp_path: Path) -> None:
    docs = documents()
    (config,) = [d for (kind, _), d in docs.items() if kind == "ConfigMap"]
    for name, text in config["data"].items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (secret,) = [d for (kind, _), d in docs.items() if kind == "Secret"]
    recipients = tmp_path / "recipients.csv"
    recipients.write_text("id,email,first_name\nr1,r1@example.com,Ann\n", encoding="utf-8")
    campaign = load_campaign(tmp_path / "campaign.toml", recipients, env=secret["stringData"])
    assert campaign.sources["shop"].rate_limit == 200


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_the_gnu_parallel_example_is_valid_bash() -> None:
    result = subprocess.run(["bash", "-n", str(DEPLOY / "parallel" / "render.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
